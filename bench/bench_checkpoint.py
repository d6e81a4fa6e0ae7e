"""Checkpoints: save/restore seconds against model size, SYNC vs ASYNC upload, and how long the step loop pauses.

    python -m bench.bench_checkpoint [--depths 4 12 20] [--parts files loop ray] [--loop-seq-len 256]
                                     [--device cpu] [--ray-mb 1024] [--dry-run]

Models at the reference's shapes (T 2048, vocab 32768, aspect 64, head_dim 128, value embeddings) are built on
the meta device and materialised with `to_empty` + `init_weights` (zero-filled outside the timing so their
pages are resident, as a trained model's are), with an optimizer state of exactly MuonAdamW's tensor shapes (AdamW:
exp_avg + exp_avg_sq per param; Muon: one stacked momentum + factored second moment per group,
`raychat.optim._muon_state_shapes`; checked equal to a real `step()`'s state at d4).

Part 1, the files (no Ray), per depth:
- `save`: `state_dict()` + `raychat.checkpoint.save_rank_files` into a fresh local temp dir;
- `upload`: the SYNC upload to local storage (Ray copies the directory: `shutil.copytree` here);
- `restore`: `raychat.checkpoint.load_rank_state` (completeness check + torch.load of model and optimizer);
- `copy` / `write`: `raychat.saver.BackgroundWriter` with nothing else running: seconds to stage (copy
  every tensor into host buffers: fresh ones, then the kept ones a second time) and to write the files.
Before the background writer, the loop paused for save + upload (+ deleting the temp dir).

Part 2, the step loop with the writer, per depth: training steps of that model (forward + backward at batch
1 x `--loop-seq-len` tokens, `--threads` torch threads; embedding tables frozen, see bench_loop) in the loop's
order: `reserve` after the first step, then at a save step `submit`, then steps that each call `wait_staged()`
where the loop calls `optimizer.step()` and poll `done()` as the loop's report does, until the files are
written (`--device cuda`: the model on the GPU under bf16 autocast, staged into pinned host buffers on a side
stream, as in training on a GPU). Printed: how long the loop was blocked (submit + every wait_staged), and how
much longer the overlapped steps took than the median of the steps around them (the writer's copy and write
compete with training for this machine's cores and memory bandwidth). The optimizer step itself is left out:
it comes after wait_staged, so it never overlaps staging, and at d20 its temporaries would not fit in memory
beside two copies of the state.

Part 3, Ray Train: a tiny train function (below, bench-only) reports a checkpoint directory of
that many MB three times, with `CheckpointUploadMode.SYNC` and then `ASYNC`, doing `--work-s` seconds of
"training" between reports; it records how long each `ray.train.report` call blocks.
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench.bench_train import BENCH_ENV

for _k, _v in BENCH_ENV.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

torch.set_num_threads(1)


def reference_model(depth: int):
    """The reference's model at `depth` (base_train defaults), on the meta device."""
    from raychat.model import GPT, GPTConfig

    width = -(-depth * 64 // 128) * 128  # aspect 64, rounded up to head_dim 128 (config.derive)
    cfg = GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=depth, n_head=width // 128, n_kv_head=width // 128,
                    n_embd=width, window_pattern="SSSL")
    with torch.device("meta"):
        return GPT(cfg)


def materialise(depth: int, device: str = "cpu"):
    """(model, optimizer) on `device` with a full optimizer state of MuonAdamW's shapes, every value zero."""
    from raychat.optim import MuonAdamW, _muon_state_shapes

    model = reference_model(depth)
    model.to_empty(device=device)
    model.init_weights()  # the rotary tables, and on CUDA the bf16 embeddings, as in training
    optimizer = MuonAdamW(model.optimizer_groups())
    for group in optimizer.param_groups:
        params = group["params"]
        if group["kind"] == "adamw":
            for p in params:
                optimizer.state[p] = {"step": 1, "exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p)}
        else:
            shape1, shape2 = _muon_state_shapes(*params[0].shape, len(params))
            optimizer.state[params[0]] = {"momentum_buffer": torch.empty(shape1, dtype=params[0].dtype, device=device),
                                          "second_momentum_buffer": torch.empty(shape2, dtype=torch.float32,
                                                                                device=device)}
    # Touch every page now: a trained model's memory is resident, and first-touch page faults inside the timed
    # save would be charged to torch.save (they made d4's save ~10x slower in a first run).
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()
    return model, optimizer


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def bench_files(depth: int, scratch: str) -> dict:
    from raychat import checkpoint as ckpt_files
    from raychat.saver import BackgroundWriter

    model, optimizer = materialise(depth)
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model_state, optim_state = model.state_dict(), optimizer.state_dict()
    d = tempfile.mkdtemp(prefix="ckpt-", dir=scratch)
    ckpt_files.save_rank_files(d, 0, optim_state, [{"bench": True}], model_state=model_state,
                               meta={"step": 1, "world_size": 1})
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    dest = os.path.join(scratch, f"storage_d{depth}")
    shutil.copytree(d, dest)
    upload = time.perf_counter() - t0
    t0 = time.perf_counter()
    shutil.rmtree(d)
    cleanup = time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest))
    # The background writer alone: staging (the copy the loop must not overtake) and the write after it, first
    # into fresh buffers, then again into the kept ones (the loop reserves them after its first step). It
    # needs a second copy of the state in memory: skip it where that would not fit.
    copy_fresh = copy = write = float("nan")
    if available_bytes() > 1.5 * nbytes:
        writer = BackgroundWriter()
        for i in range(2):
            d2 = tempfile.mkdtemp(prefix="ckpt-bg-", dir=scratch)
            writer.submit(d2, 0, optim_state, [{"bench": True}], model_state=model_state,
                          meta={"step": 1, "world_size": 1})
            writer.wait()
            shutil.rmtree(d2)
            if i == 0:
                copy_fresh = writer.timings["staged"]
        copy, write = writer.timings["staged"], writer.timings["written"] - writer.timings["staged"]
        del writer
    del model, optimizer, model_state, optim_state
    t0 = time.perf_counter()
    loaded = ckpt_files.load_rank_state(dest, 0, 1, "cpu")
    restore = time.perf_counter() - t0
    del loaded
    shutil.rmtree(dest)
    return {"depth": depth, "params": params, "bytes": nbytes, "save": save, "upload": upload, "cleanup": cleanup,
            "restore": restore, "copy_fresh": copy_fresh, "copy": copy, "write": write}


def bench_loop(depth: int, seq_len: int, scratch: str, device: str = "cpu", steps_before: int = 3) -> dict:
    """Part 2: the step loop around a checkpoint, in raychat/loop.py's order (see the module docstring)."""
    from raychat import checkpoint as ckpt_files
    from raychat.saver import BackgroundWriter

    model, optimizer = materialise(depth, device)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, model.config.vocab_size, (1, seq_len), generator=g).to(device) for _ in range(2))
    with torch.no_grad():  # zero weights would make every step trivially the same; any values will do
        for p in model.parameters():
            p.copy_(torch.empty(p.shape).normal_(0, 0.02, generator=g))
    cuda = device == "cuda"
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    # Embedding tables get no gradient here: their backward is a scatter-add (no compute to speak of), but
    # their gradients are 1.9 GB at d20, which with two copies of the state would not fit in this VM's memory.
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            m.weight.requires_grad_(False)

    def step(writer) -> tuple[float, float]:
        """One step; returns (its seconds, seconds blocked in wait_staged)."""
        t0 = time.perf_counter()
        with autocast:
            loss = model(x, y)
        loss.backward()
        synchronize()
        t1 = time.perf_counter()
        writer.wait_staged()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=False)  # keep the gradients' memory, as the next step needs it anyway
        return t2 - t0, t2 - t1

    writer = BackgroundWriter()
    step(writer)  # allocates the gradients
    writer.reserve(optimizer.state_dict(), model.state_dict())  # as the loop does after its first step
    writer.wait()  # (in the loop this overlaps the next steps; here it would blur the baseline)
    normal = [step(writer)[0] for _ in range(steps_before)]
    d = tempfile.mkdtemp(prefix="ckpt-loop-", dir=scratch)
    t0 = time.perf_counter()
    writer.submit(d, 0, optimizer.state_dict(), [{"bench": True}], model_state=model.state_dict(),
                  meta={"step": 1, "world_size": 1})
    submit = time.perf_counter() - t0
    overlapped, waits = [], []
    while True:
        dt, wait = step(writer)
        overlapped.append(dt)
        waits.append(wait)
        if writer.done():  # the loop's flush_report(block=False) polls exactly this at the next step's top
            break
    writer.wait()
    after = [step(writer)[0] for _ in range(2)]
    shutil.rmtree(d)
    base = statistics.median(normal + after)
    return {"depth": depth, "seq_len": seq_len, "step": base, "submit": submit, "waits": waits,
            "blocked": submit + sum(waits), "overlapped_steps": len(overlapped),
            "extra": sum(overlapped) - len(overlapped) * base, "copy": writer.timings["staged"],
            "write": writer.timings["written"] - writer.timings["staged"]}


def _report_loop(config: dict) -> None:
    """Bench-only Ray Train function: report a `mb`-MB checkpoint `n` times per upload mode, timing report()."""
    import numpy as np
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    blob = np.zeros(config["mb"] * 2**20, dtype=np.uint8)
    times = {}
    i = 0
    for mode in ("SYNC", "ASYNC"):
        times[mode] = {"write": [], "report": []}
        for _ in range(config["n"]):
            t0 = time.perf_counter()
            d = tempfile.mkdtemp(prefix="bench-ckpt-")  # not a TemporaryDirectory: ASYNC deletes it after upload
            blob.tofile(os.path.join(d, "model.pt"))
            t1 = time.perf_counter()
            ray.train.report({"i": i}, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"ckpt_{i:03d}",
                             checkpoint_upload_mode=getattr(CheckpointUploadMode, mode))
            t2 = time.perf_counter()
            if mode == "SYNC":
                shutil.rmtree(d, ignore_errors=True)  # what RayTrainSession.report does after a SYNC upload
            times[mode]["write"].append(t1 - t0)
            times[mode]["report"].append(t2 - t1)
            time.sleep(config["work_s"])  # the training steps between two checkpoints
            i += 1
    ray.train.report({"i": i})  # waits for the last ASYNC upload
    with open(config["out"], "w") as f:
        json.dump(times, f)


def bench_ray(mb: int, n: int, work_s: float) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = tempfile.mkdtemp(prefix="raychat-bench-ray-")
    out = os.path.join(storage, "times.json")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        TorchTrainer(_report_loop, train_loop_config={"mb": mb, "n": n, "work_s": work_s, "out": out},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="ckpt-bench", storage_path=storage)).fit()
    finally:
        ray.shutdown()
    with open(out) as f:
        times = json.load(f)
    shutil.rmtree(storage, ignore_errors=True)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="*", default=[4, 12, 20])
    p.add_argument("--parts", nargs="+", choices=["files", "loop", "ray"], default=["files", "loop", "ray"],
                   help="which parts to run (each part needs the machine's memory for itself at d20)")
    p.add_argument("--loop-seq-len", type=int, default=256, help="tokens per training step in part 2")
    p.add_argument("--threads", type=int, default=2, help="torch threads for part 2's training steps")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where part 2's model trains (cuda: bf16 autocast, staged to pinned host buffers)")
    p.add_argument("--ray-mb", type=int, default=1024, help="checkpoint size for the SYNC/ASYNC run")
    p.add_argument("--ray-reports", type=int, default=3, help="checkpoints per upload mode")
    p.add_argument("--work-s", type=float, default=5.0, help="seconds of 'training' between two reports")
    p.add_argument("--scratch", default=tempfile.gettempdir(), help="local disk for the checkpoint files")
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    a = p.parse_args(argv)
    bad = [d for d in a.depths if d < 1]
    if bad:
        p.error(f"--depths {bad}: depths must be >= 1")
    if min(a.ray_mb, a.ray_reports, a.loop_seq_len, a.threads) < 1 or a.work_s < 0:
        p.error("--ray-mb, --ray-reports, --loop-seq-len and --threads must be >= 1, --work-s >= 0")
    print(f"settings: {vars(a)}")
    if a.dry_run:
        return 0
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for depth in a.depths if "files" in a.parts else []:
        params = sum(p.numel() for p in reference_model(depth).parameters())
        need = 4 * params * 4.2  # fp32 params + optimizer state (~2.2x) + restored copy, with margin
        if need > available_bytes():
            print(f"d{depth}: skipped, needs ~{need / 2**30:.1f} GiB of memory, {available_bytes() / 2**30:.1f} available")
            continue
        r = bench_files(depth, a.scratch)
        rows.append(r)
        gb = r["bytes"] / 1e9
        print(f"d{depth}: {r['params'] / 1e6:.0f}M params, {gb:.2f} GB on disk | save {r['save']:.2f} s "
              f"({gb / r['save']:.2f} GB/s) | upload (copy) {r['upload']:.2f} s | rmtree {r['cleanup']:.2f} s | "
              f"restore {r['restore']:.2f} s ({gb / r['restore']:.2f} GB/s) | synchronous save+upload+rmtree "
              f"{r['save'] + r['upload'] + r['cleanup']:.2f} s | background writer alone: copy into fresh buffers "
              f"{r['copy_fresh']:.2f} s, into kept buffers {r['copy']:.2f} s, write {r['write']:.2f} s | load {os.getloadavg()[0]:.1f}", flush=True)
    for depth in a.depths if "loop" in a.parts else []:
        model = reference_model(depth)
        params = sum(p.numel() for p in model.parameters())
        grads = sum(p.numel() for m in model.modules() if not isinstance(m, torch.nn.Embedding)
                    for p in m.parameters(recurse=False))
        if a.device == "cuda":  # host memory holds only the staged copy of the state
            need = 4 * 2.56 * params + 1.5 * 2**30
        else:  # the state twice, gradients, activations
            need = 4 * (2 * 2.56 * params + grads) + 1.5 * 2**30
        if need > available_bytes():
            print(f"d{depth} loop: skipped, needs ~{need / 2**30:.1f} GiB of memory, {available_bytes() / 2**30:.1f} available")
            continue
        torch.set_num_threads(a.threads)
        r = bench_loop(depth, a.loop_seq_len, a.scratch, a.device)
        torch.set_num_threads(1)
        print(f"d{depth} loop on {a.device} (batch 1 x {r['seq_len']}, {a.threads} threads): step {r['step']:.2f} s | checkpoint: "
              f"submit {r['submit'] * 1000:.1f} ms, wait_staged {', '.join(f'{w * 1000:.1f}' for w in r['waits'])} ms "
              f"-> loop blocked {r['blocked']:.3f} s | copied in {r['copy']:.2f} s, written {r['write']:.2f} s later, "
              f"behind {r['overlapped_steps']} steps that took {r['extra']:+.2f} s longer in all "
              f"({100 * r['extra'] / (r['overlapped_steps'] * r['step']):+.0f}%) | load {os.getloadavg()[0]:.1f}",
              flush=True)
    if "ray" in a.parts:
        t = bench_ray(a.ray_mb, a.ray_reports, a.work_s)
        for mode, v in t.items():
            print(f"Ray Train report of a {a.ray_mb} MB checkpoint, {mode}: write {statistics.median(v['write']):.2f} s, "
                  f"report() blocks {', '.join(f'{x:.2f}' for x in v['report'])} s (median "
                  f"{statistics.median(v['report']):.2f})")
        print(f"report() blocking ASYNC / SYNC: "
              f"{statistics.median(t['ASYNC']['report']) / statistics.median(t['SYNC']['report']):.3f}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
