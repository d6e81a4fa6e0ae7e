"""Checkpoints: save/restore seconds against model size, and how long the step loop pauses, SYNC vs ASYNC.

    python -m bench.bench_checkpoint [--depths 4 12 20] [--ray-mb 1024] [--dry-run]

Part 1, the files (no Ray): for each depth, the reference's model at that depth (T 2048, vocab 32768, aspect
64, head_dim 128, value embeddings) is built on the meta device and materialised with `to_empty` (no init
cost; zero-filled outside the timing so its pages are resident, as a trained model's are), with an optimizer
state of exactly MuonAdamW's tensor shapes (AdamW: exp_avg + exp_avg_sq per param; Muon: one stacked
momentum + factored second moment per group, `raychat.optim._muon_state_shapes`; checked equal to a real
`step()`'s state at d4). Timed, as the loop does them at a save step (raychat/loop.py "checkpoint"):
- `save`: `state_dict()` + `raychat.checkpoint.save_rank_files` into a fresh local temp dir;
- `upload`: the SYNC upload to local storage (Ray copies the directory: `shutil.copytree` here);
- `restore`: `raychat.checkpoint.load_rank_files` (completeness check + torch.load of model and optimizer);
- `snapshot`: `raychat.checkpoint.BackgroundWriter.submit`, which copies every tensor into new CPU memory and
  starts the write on a thread: the step loop's whole pause (on a GPU this is the device-to-host copy);
  `background_write` is how long the thread then writes while training continues.
Before the background writer, the loop paused for save + upload (+ deleting the temp dir).

Part 2, Ray Train (`--ray-mb`): a tiny train function (below, bench-only) reports a checkpoint directory of
that many MB three times, with `CheckpointUploadMode.SYNC` and then `ASYNC`, doing `--work-s` seconds of
"training" between reports; it records how long each `ray.train.report` call blocks.
"""
import argparse
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


def materialise(depth: int):
    """(model, optimizer) on the CPU with a full optimizer state of MuonAdamW's shapes (values uninitialised)."""
    from raychat.optim import _muon_state_shapes

    model = reference_model(depth)
    model.to_empty(device="cpu")
    optimizer = model.setup_optimizer()
    for group in optimizer.param_groups:
        params = group["params"]
        if group["kind"] == "adamw":
            for p in params:
                optimizer.state[p] = {"step": 1, "exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p)}
        else:
            shape1, shape2 = _muon_state_shapes(*params[0].shape, len(params))
            optimizer.state[params[0]] = {"momentum_buffer": torch.empty(shape1, dtype=params[0].dtype),
                                          "second_momentum_buffer": torch.empty(shape2, dtype=torch.float32)}
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


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def bench_files(depth: int, scratch: str) -> dict:
    from raychat import checkpoint as ckpt_files

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
    # The loop's pause with raychat's BackgroundWriter: the snapshot taken by submit(); the files are written
    # while training goes on (wait() is when the next report needs them). It needs a second copy of the state
    # in memory: skip it where that would not fit.
    snapshot = background_write = float("nan")
    if available_bytes() > 1.5 * nbytes:
        writer = ckpt_files.BackgroundWriter()
        d2 = tempfile.mkdtemp(prefix="ckpt-bg-", dir=scratch)
        t0 = time.perf_counter()
        writer.submit(d2, 0, optim_state, [{"bench": True}], model_state=model_state, meta={"step": 1, "world_size": 1})
        snapshot = time.perf_counter() - t0
        writer.wait()
        background_write = time.perf_counter() - t0 - snapshot
        shutil.rmtree(d2)
    del model, optimizer, model_state, optim_state
    t0 = time.perf_counter()
    loaded = ckpt_files.load_rank_files(dest, 0, "cpu")
    restore = time.perf_counter() - t0
    del loaded
    shutil.rmtree(dest)
    return {"depth": depth, "params": params, "bytes": nbytes, "save": save, "upload": upload, "cleanup": cleanup,
            "restore": restore, "snapshot": snapshot, "background_write": background_write}


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
    p.add_argument("--ray-mb", type=int, default=1024, help="checkpoint size for the SYNC/ASYNC run; 0 skips it")
    p.add_argument("--ray-reports", type=int, default=3, help="checkpoints per upload mode")
    p.add_argument("--work-s", type=float, default=5.0, help="seconds of 'training' between two reports")
    p.add_argument("--scratch", default=tempfile.gettempdir(), help="local disk for the checkpoint files")
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    a = p.parse_args(argv)
    bad = [d for d in a.depths if d < 1]
    if bad:
        p.error(f"--depths {bad}: depths must be >= 1")
    if a.ray_mb < 0 or a.ray_reports < 1 or a.work_s < 0:
        p.error("--ray-mb must be >= 0, --ray-reports >= 1 and --work-s >= 0")
    print(f"settings: {vars(a)}")
    if a.dry_run:
        return 0
    print(f"load average before: {os.getloadavg()}")
    rows = []
    for depth in a.depths:
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
              f"restore {r['restore']:.2f} s ({gb / r['restore']:.2f} GB/s) | loop pause with the background writer (snapshot) {r['snapshot']:.2f} s, "
              f"then written behind the loop in {r['background_write']:.2f} s | "
              f"pause of a synchronous save+upload+rmtree {r['save'] + r['upload'] + r['cleanup']:.2f} s | "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    if a.ray_mb:
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
