"""CORE throughput: examples/s of `evaluate_core` on a d4 GPT on CPU, 1 worker against 2 (gloo processes).

The real eval bundle cannot be downloaded here (no internet), so the script writes a synthetic bundle in the
real layout: the 22 documented tasks (labels, types, few-shot counts, delimiters, baselines from
`CORE_TASKS`), `--examples` items each, built from tinyshakespeare lines at roughly real prompt sizes
(a 10-shot multiple-choice prompt is ~500 tokens). The model is d4 as base_train sizes it (4 layers, width
256, 2 heads of 128, T = 2048, V = 32768), randomly initialised: throughput does not depend on the weights.

Each configuration runs in fresh spawned processes (W workers x 1 thread each), timed on rank 0 from a
barrier to the end of evaluate_core; the CORE figures of all runs must agree (distribution changes nothing).

    python -m bench.bench_core_eval [--examples 11] [--workers 1,2] [--dry-run]
"""
import argparse
import contextlib
import io
import json
import os
import random
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp
import yaml

from raychat.core_eval import CORE_TASKS, evaluate_core
from raychat.model import GPT, GPTConfig
from raychat.tokenizer import Tokenizer

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


def _lines() -> list[str]:
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            return [ln.strip() for ln in f if len(ln.split()) >= 4]
    rng = random.Random(0)
    words = "the king queen lord lady sword crown night day love death heart blood fair foul sweet".split()
    return [" ".join(rng.choices(words, k=8)) for _ in range(2000)]


def _item(task_type: str, rng: random.Random, lines: list[str]) -> dict:
    pick = lambda k: " ".join(rng.choice(lines) for _ in range(k))  # noqa: E731
    if task_type == "multiple_choice":
        return {"query": pick(2), "choices": [rng.choice(lines) for _ in range(4)], "gold": rng.randrange(4)}
    if task_type == "schema":
        return {"context_options": [pick(1), pick(1)], "continuation": pick(1), "gold": rng.randrange(2)}
    words = rng.choice(lines).split()
    return {"context": pick(2), "continuation": " ".join(words[:3])}


def write_bundle(root: str, examples: int) -> str:
    """`<root>/eval_bundle/` with the 22 documented tasks and `examples` synthetic items each."""
    lines, rng = _lines(), random.Random(0)
    bundle = os.path.join(root, "eval_bundle")
    os.makedirs(os.path.join(bundle, "eval_data"), exist_ok=True)
    icl_tasks = []
    for t in CORE_TASKS:
        icl_tasks.append({"label": t.label, "dataset_uri": f"{t.label}.jsonl", "num_fewshot": [t.num_fewshot],
                          "icl_task_type": t.task_type, "continuation_delimiter": t.delimiter})
        with open(os.path.join(bundle, "eval_data", f"{t.label}.jsonl"), "w") as f:
            for _ in range(examples):
                f.write(json.dumps(_item(t.task_type, rng, lines)) + "\n")
    with open(os.path.join(bundle, "core.yaml"), "w") as f:
        yaml.safe_dump({"icl_tasks": icl_tasks}, f, sort_keys=False)
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Random baseline\n")
        f.writelines(f"{t.label},{t.random_baseline}\n" for t in CORE_TASKS)
    return bundle


def d4_gpt() -> GPT:
    torch.manual_seed(42)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=4, n_head=2, n_kv_head=2, n_embd=256))
    model.to_empty(device="cpu")
    model.init_weights()
    return model.eval()


class CountingModel(torch.nn.Module):
    """The d4 GPT behind the scorer's callable interface, counting the token positions it is run on."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model, self.positions = model, 0
        self.rotary_seq_len = model.rotary_seq_len  # keeps the scorer's length check

    def forward(self, input_ids):
        self.positions += input_ids.numel()
        return self.model(input_ids)


def _worker(rank, world_size, port, tokenizer_dir, bundle_dir, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        tok, model = Tokenizer.from_directory(tokenizer_dir), CountingModel(d4_gpt())
        if world_size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as log:
            out = evaluate_core(model, tok, "cpu", max_per_task=-1, bundle_dir=bundle_dir)
        seconds = time.perf_counter() - t0
        positions = torch.tensor(model.positions)
        if world_size > 1:
            dist.all_reduce(positions)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump({"seconds": seconds, "positions": positions.item(), "core": out, "log": log.getvalue()}, f)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=11,
                        help="items per task (>= 11: ten-shot tasks need 10 others)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    parser.add_argument("--tokenizer-vocab", type=int, default=4096, help="vocab of the tokenizer trained here")
    parser.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.examples < 11:
        parser.error(f"--examples={args.examples}: the 10-shot tasks need at least 11 items")
    if any(w < 1 for w in workers):
        parser.error(f"--workers={args.workers}: every count must be >= 1")
    print(f"examples/task: {args.examples} x 22 tasks | workers: {workers} | d4 GPT (V=32768, T=2048) | "
          f"tokenizer vocab {args.tokenizer_vocab} | 1 thread per worker")
    if args.dry_run:
        return

    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.train_from_iterator(iter(["\n".join(_lines())]), args.tokenizer_vocab)
        tok.save(os.path.join(tmp, "tok"))
        bundle = write_bundle(tmp, args.examples)
        total = 22 * args.examples
        runs = {}
        for w in workers:
            out_path = os.path.join(tmp, f"w{w}.json")
            mp.spawn(_worker, args=(w, _free_port(), os.path.join(tmp, "tok"), bundle, out_path), nprocs=w)
            with open(out_path) as f:
                runs[w] = json.load(f)
            r = runs[w]
            print(f"{w} worker(s): {total} examples ({r['positions']:,} token positions) in {r['seconds']:.1f}s = "
                  f"{total / r['seconds']:.2f} examples/s, {r['positions'] / r['seconds']:,.0f} positions/s | "
                  f"CORE {r['core']['core_metric']:.4f}")
        print("per-task times (first run):")
        print(runs[workers[0]]["log"].rstrip())
        base = workers[0]
        for w in workers[1:]:
            same = runs[w]["core"] == runs[base]["core"]
            print(f"speed-up {w} vs {base} worker(s): {runs[base]['seconds'] / runs[w]['seconds']:.2f}x | "
                  f"identical results: {same}")


if __name__ == "__main__":
    main()
