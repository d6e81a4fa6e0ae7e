"""`python -m raychat.eval`: evaluate a base model checkpoint (the reference's scripts/base_eval).

    python -m raychat.eval --run-name d24-speedrun [--step N]     # a raychat run under --storage-path
    python -m raychat.eval --checkpoint DIR                        # one raychat checkpoint directory
    python -m raychat.eval --nanochat DIR [--step N]               # a nanochat base_checkpoints/<tag> dir

It measures CORE, bits per byte on the train and val splits and draws samples (the seven greedy prompts plus
unconditioned samples at temperature 1), on `--num-workers` Ray Train workers that split the examples and
reduce the results. Results go beside the checkpoint as eval.json and eval.md.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

import torch

from raychat import checkpoint as ckpt_files
from raychat import runs, storage
from raychat.common import cli_parser, get_base_dir
from raychat.device import DeviceContext, process_env

EVALS = ("core", "bpb", "sample")


def build_parser() -> argparse.ArgumentParser:
    p = cli_parser("raychat.eval", "Evaluate a raychat or nanochat base model: CORE, bpb, samples")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-name", help="a raychat run under --storage-path (its newest complete checkpoint)")
    src.add_argument("--checkpoint", help="a raychat checkpoint directory (step_XXXXXX)")
    src.add_argument("--nanochat", help="a nanochat checkpoint directory holding model_XXXXXX.pt + meta_XXXXXX.json")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--storage-path", default=None, help="where runs live (default <base>/runs)")
    p.add_argument("--eval", default="core,bpb,sample", help="comma-separated subset of core,bpb,sample")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE examples per task (-1 = all)")
    p.add_argument("--device-batch-size", type=int, default=None,
                   help="rows per bpb batch (default: the run's, so its val bpb is reproduced; 32 for nanochat)")
    p.add_argument("--split-tokens", type=int, default=40 * 524288, help="tokens per split for bpb")
    p.add_argument("--base-dir", default=None, help="base directory (default $RAYCHAT_BASE_DIR or ~/.cache/raychat)")
    p.add_argument("--data-dir", default=None, help="shard directory (default <base>/base_data)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default <base>/tokenizer)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers that split the work")
    p.add_argument("--use-gpu", default="auto", choices=["auto", "true", "false"],
                   help="evaluate on GPUs (auto = when the cluster has one per worker)")
    p.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--out-dir", default=None, help="where eval.json/eval.md go (default: beside the checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="validate the arguments, print the settings and exit (the checkpoint is looked up at launch)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    unknown = set(args.eval.split(",")) - set(EVALS)
    if unknown:
        raise ValueError(f"--eval {args.eval!r}: unknown evaluation(s) {sorted(unknown)}; choose from {EVALS}")
    if args.num_workers < 1:
        raise ValueError(f"--num-workers {args.num_workers}: must be at least 1")
    if (args.device_batch_size is not None and args.device_batch_size < 1) or args.split_tokens < 1:
        raise ValueError("--device-batch-size and --split-tokens must be positive")
    base = get_base_dir(args.base_dir, create=False) if not args.dry_run else (args.base_dir or "<base>")
    args.base_dir = base
    args.data_dir = args.data_dir or os.path.join(base, "base_data")
    args.tokenizer_dir = args.tokenizer_dir or os.path.join(base, "tokenizer")
    args.storage_path = args.storage_path or os.path.join(base, "runs")
    for name in ("data_dir", "tokenizer_dir", "storage_path", "checkpoint", "nanochat", "out_dir"):
        value = getattr(args, name)
        if not args.dry_run:
            setattr(args, name, storage.absolute(value))
    return args


@contextlib.contextmanager
def open_checkpoint(args):
    """(kind, path, local directory) of the checkpoint to evaluate: 'raychat' with a step_XXXXXX directory
    (local, or a bucket's downloaded) or 'nanochat' with its directory."""
    if args.nanochat:
        yield "nanochat", args.nanochat, args.nanochat
    elif args.checkpoint:
        with storage.materialise(args.checkpoint) as d:
            if (problem := ckpt_files.check_complete(d)) is not None:
                raise ValueError(f"--checkpoint {args.checkpoint} cannot be used: {problem}; pick another checkpoint")
            yield "raychat", args.checkpoint, d
    else:
        with runs.find_checkpoint(runs.find_run(args.storage_path, args.run_name), args.step) as found:
            yield "raychat", found.path, found.local_dir


def load_model(kind: str, directory: str, step, device, compute: str = "auto"):
    """(model, meta) in eval mode on `device`. A 2026-07 model computes in its recipe's dtype (`compute`: as
    --compute-dtype; auto = bf16 on CUDA from sm80, fp32 elsewhere), a seed one as the seed does; the model's
    `compute_dtype` says which (None: the seed's bf16 autocast on CUDA)."""
    from raychat.device import compute_dtype
    from raychat.model import GPT, GPTConfig

    if kind == "nanochat":  # upcasts bf16 off CUDA itself, as the reference's build_model
        state, meta = ckpt_files.load_nanochat_model(directory, step, device=device)
    else:
        state = torch.load(os.path.join(directory, ckpt_files.MODEL_FILE), map_location=device, weights_only=True)
        meta = ckpt_files.read_meta(directory)
    meta["model_config"] = ckpt_files.with_model_options(meta["model_config"])
    seed = ckpt_files.recipe_of(meta["model_config"]) == "seed"
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device=device)
    # The rotary buffers and the device's dtypes; the weights come next.
    model.init_weights(compute_dtype=None if seed else compute_dtype(compute, torch.device(device)))
    # Copied into the model's own tensors, as the training loop resumes: each takes the dtype this device gives
    # it (a CUDA run's bf16 embeddings become fp32 on a CPU, a CPU run's fp32 ones bf16 on a GPU).
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta


def evaluate(args, session) -> dict:
    """Run the requested evaluations on this worker's share; rank 0 writes the results. Returns them."""
    from raychat.core_eval import download_eval_bundle, evaluate_core
    from raychat.data.shards import split_shards
    from raychat.data.stream import PackedStream, val_stream
    from raychat.engine import Engine
    from raychat.inputs import read_tokenizer_files
    from raychat.loop import SAMPLE_PROMPTS, load_tokenizer
    from raychat.loss_eval import bpb_from_sums, bpb_sums

    rank, world = session.rank, session.world_size
    dev = DeviceContext.for_session(session, args.device_type)
    device = dev.device
    with open_checkpoint(args) as (kind, directory, local_dir):
        model, meta = load_model(kind, local_dir, args.step, device)
    dev.compute_dtype = model.compute_dtype  # a 2026-07 model casts itself: no autocast
    # From bytes, so that the tokenizer may live in a bucket as the shards do.
    tokenizer, token_bytes = load_tokenizer(read_tokenizer_files(args.tokenizer_dir), device)
    if tokenizer.get_vocab_size() != meta["model_config"]["vocab_size"]:
        raise ValueError(f"tokenizer {args.tokenizer_dir} has {tokenizer.get_vocab_size()} tokens but the model "
                         f"was trained with {meta['model_config']['vocab_size']}: pass the run's --tokenizer-dir")
    todo = args.eval.split(",")
    results = {"checkpoint": directory, "kind": kind, "step": meta.get("step"), "model_config": meta["model_config"]}
    session.log(f"Evaluating {kind} checkpoint {directory} (step {meta.get('step')}) on {world} worker(s)")

    if "core" in todo:
        core = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task,
                             bundle_dir=download_eval_bundle(args.base_dir), autocast_ctx=dev.autocast())
        results["core"] = core
        session.log(f"CORE metric: {core['core_metric']:.4f}")
    if "bpb" in todo:
        # The batches are laid out as the training run's evaluations laid them out (its device batch size,
        # one stream per training rank: which documents a batch packs depends on both), so a raychat
        # checkpoint's val bpb here equals the one its run logged at that step for the same token count. A
        # checkpoint exported to nanochat keeps the run's flags (user_config), a nanochat one has neither.
        B = args.device_batch_size or meta.get("device_batch_size") or 32
        T = meta["model_config"]["sequence_len"]
        trained_workers = meta.get("user_config", {}).get("num_workers")
        streams = meta.get("world_size") or (trained_workers if isinstance(trained_workers, int) else world)
        steps = args.split_tokens // (B * T * streams)
        if steps < 1:
            raise ValueError(f"--split-tokens {args.split_tokens} is less than one batch of {B}x{T}x{streams} tokens")
        layout = f"{streams} stream(s) x {steps} batch(es) of {B}x{T} tokens, as the training run evaluated"
        train_files, val_file = split_shards(args.data_dir)
        results["bpb"], results["bpb_layout"] = {}, layout
        for split in ("train", "val"):
            nats = torch.zeros((), dtype=torch.float32, device=device)
            nbytes = torch.zeros((), dtype=torch.int64, device=device)
            for s in range(rank, streams, world):  # this worker's share of the streams, added in stream order
                stream = (PackedStream(train_files, tokenizer, B, T, slot=s, num_slots=streams, backend="inline")
                          if split == "train" else val_stream(val_file, tokenizer, B, T, s, streams))
                with stream, torch.no_grad(), dev.autocast():
                    n, b = bpb_sums(model, (dev.to_device(x, y) for x, y in stream), steps, token_bytes)
                nats, nbytes = nats + n, nbytes + b
            results["bpb"][split] = bpb = bpb_from_sums(nats, nbytes)
            session.log(f"{split} bpb: {bpb:.6f} ({layout})")
    if "sample" in todo and rank == 0:
        engine = Engine(model, tokenizer)
        samples = []
        with dev.autocast():
            for prompt in SAMPLE_PROMPTS:
                seqs, _ = engine.generate_batch(tokenizer(prompt, prepend="<|bos|>"), num_samples=1, max_tokens=16,
                                                temperature=0)
                samples.append(tokenizer.decode(seqs[0]))
            seqs, _ = engine.generate_batch([tokenizer.get_bos_token_id()], num_samples=8, max_tokens=128,
                                            temperature=1.0)
        unconditioned = [tokenizer.decode(s) for s in seqs]
        results["samples"] = {"prompted": samples, "unconditioned": unconditioned}
        for s in samples + unconditioned:
            session.log("-" * 60 + "\n" + s)
    if rank == 0:
        from raychat.report import add_evaluation

        out_dir = args.out_dir or directory
        md = write_results(results, out_dir)
        session.log(f"Wrote {os.path.join(out_dir, 'eval.json')} and eval.md")
        report = os.path.join(os.path.dirname(os.path.normpath(directory)), "report.md")
        if kind == "raychat" and not storage.is_remote(directory) and add_evaluation(report, md):
            session.log(f"Added the evaluation to the run's report {report}")
    return results


def write_results(results: dict, out_dir: str) -> str:
    """eval.json and eval.md into out_dir (local, s3:// or gs://); returns the markdown."""
    md = [f"## Base model evaluation: {results['checkpoint']}", "", f"- step: {results['step']}"]
    if "core" in results:
        md += ["", "| Task | Accuracy | Centered |", "|---|---|---|"]
        core = results["core"]
        md += [f"| {k} | {core['results'][k]:.4f} | {core['centered_results'][k]:.4f} |" for k in core["results"]]
        md.append(f"| CORE | | {core['core_metric']:.4f} |")
    if "bpb" in results:
        md += [""] + [f"- {split} bpb: {v:.6f}" for split, v in results["bpb"].items()]
        md.append(f"- bpb batches: {results['bpb_layout']}")
    if "samples" in results:
        md += ["", "### Samples", ""] + ["```\n" + s + "\n```" for s in results["samples"]["prompted"]]
        md += ["", "### Unconditioned samples (temperature 1)", ""]
        md += ["```\n" + s + "\n```" for s in results["samples"]["unconditioned"]]
    tmp = tempfile.mkdtemp()
    for name, text in (("eval.json", json.dumps(results, indent=2)), ("eval.md", "\n".join(md) + "\n")):
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    if storage.is_remote(out_dir):
        storage.copy_into(tmp, out_dir)
    else:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(tmp):
            shutil.move(os.path.join(tmp, name), os.path.join(out_dir, name))  # whole files only
    shutil.rmtree(tmp)
    return "\n".join(md) + "\n"


def _eval_worker(config: dict) -> None:
    from raychat.session import RayTrainSession

    evaluate(argparse.Namespace(**config), RayTrainSession())


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.dry_run:
            print("raychat.eval settings:", json.dumps(vars(args), indent=2))
            return 0
        with open_checkpoint(args):  # a missing or damaged checkpoint fails here, before any worker starts
            pass
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.num_workers == 1 and not os.environ.get("RAY_ADDRESS"):
        from raychat.session import LocalSession

        evaluate(args, LocalSession())
        return 0
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raychat import local_ray

    local_ray.init(args.num_workers)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = args.use_gpu == "true" or (args.use_gpu == "auto" and gpus >= args.num_workers > 0 and gpus > 0)
    args.device_type = "cuda" if use_gpu else (args.device_type or "cpu")
    trainer = TorchTrainer(
        _eval_worker, train_loop_config=vars(args),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"eval-{os.path.basename(args.checkpoint or args.nanochat or args.run_name)}",
                             storage_path=tempfile.mkdtemp(prefix="raychat-eval-"),
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                              **process_env(gpu_worker=use_gpu)}}),
        torch_config=local_ray.torch_config(timeout_s=1800))  # Ray Train's default timeout
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
