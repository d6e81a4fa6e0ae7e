"""Checkpoint persistence to local disk and to an S3-compatible server, and the training steps while it runs.

    python -m bench.bench_storage [--depth 12] [--loop-depth 8] [--loop-steps 30]

The server is the tests' (tests/_s3.py: moto's standalone server from the `dev` extra, on 127.0.0.1, reached
through AWS_ENDPOINT_URL as a user reaches any S3-compatible store; no proxy in between here).

Part 1, one rank's checkpoint of the reference's model at `--depth` (bench_checkpoint.materialise: the model
and MuonAdamW's full state, fp32, as a 1-worker CPU run writes it): `save_rank_files` into a local temp dir,
then `storage.copy_to_storage` (what `session.persist` runs on the writer thread) into a directory on local
disk and into s3://. Prints the size, the seconds and MB/s of each.

Part 2, the training loop itself (`LocalSession`, tinyshakespeare, a `--loop-depth` model, a checkpoint every
10 steps): once with storage on local disk, once on s3://. Each step's dt is marked by whether a checkpoint
was being written or uploaded behind it (between its save step and the step it was reported at); printed:
the median dt of steps with and without an upload behind them, and each checkpoint's write + upload time.
"""
import argparse
import contextlib
import gzip
import io
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.bench_checkpoint import materialise  # noqa: E402
from bench.bench_train import BENCH_ENV  # noqa: E402

for _k, _v in BENCH_ENV.items():
    os.environ.setdefault(_k, _v)

STEP = re.compile(r"^step (\d+)/\d+ .*?\| dt: ([\d.]+)ms")
SAVED = re.compile(r"^Checkpoint of step (\d+): copied in ([\d.]+)s and written in ([\d.]+)s on a thread, "
                   r"reported at step (\d+)")


def bench_persist(depth: int, scratch: str, s3_root: str) -> dict:
    import pyarrow.fs as pafs

    from raychat import checkpoint as ckpt_files
    from raychat import storage

    model, optimizer = materialise(depth)
    src = tempfile.mkdtemp(prefix="ckpt-", dir=scratch)
    t0 = time.perf_counter()
    ckpt_files.save_rank_files(src, 0, optimizer.state_dict(), [{"bench": True}], model_state=model.state_dict(),
                               meta={"step": 1, "world_size": 1})
    out = {"depth": depth, "write": time.perf_counter() - t0,
           "bytes": sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))}
    del model, optimizer
    for name, dest in (("local", os.path.join(scratch, "storage", "step_000001")), ("s3", f"{s3_root}/step_000001")):
        copy = shutil.copytree(src, os.path.join(scratch, f"copy-{name}"))  # copy_to_storage deletes its source
        fs, path = storage.filesystem(dest) if name == "s3" else (pafs.LocalFileSystem(), dest)
        t0 = time.perf_counter()
        storage.copy_to_storage(copy, fs, path)
        out[name] = time.perf_counter() - t0
        storage.delete_quietly(fs, path)
    shutil.rmtree(src)
    return out


def bench_loop(depth: int, steps: int, storage_path: str, data_dir: str, tok_dir: str) -> dict:
    from raychat.config import parse_args
    from raychat.loop import train
    from raychat.session import LocalSession

    cfg = parse_args(["--depth", str(depth), "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "256",
                      "--device-batch-size", "4", "--total-batch-size", "1024", "--window-pattern", "L",
                      "--num-iterations", str(steps), "--eval-every", "-1", "--core-metric-every", "-1",
                      "--sample-every", "-1", "--save-every", "10", "--data-dir", data_dir, "--tokenizer-dir", tok_dir,
                      "--storage-path", storage_path, "--run-name", f"loop-{time.time_ns()}"]).resolve_paths()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        train(cfg, LocalSession(cfg))
    lines = log.getvalue().splitlines()
    dts = {int(m.group(1)): float(m.group(2)) for m in map(STEP.match, lines) if m}
    saves = [(int(m.group(1)), float(m.group(3)), int(m.group(4))) for m in map(SAVED.match, lines) if m]
    behind = {s for saved, _, reported in saves for s in range(saved, reported)}
    during = [dt for s, dt in dts.items() if s in behind and s > 0]
    others = [dt for s, dt in dts.items() if s not in behind and s > 0]
    return {"saves": saves, "during": during, "others": others,
            "bytes": _run_bytes(storage_path, cfg.run_name)}


def _run_bytes(storage_path: str, run_name: str) -> int:
    import pyarrow.fs as pafs

    from raychat import storage

    fs, root = storage.filesystem(storage.join(storage_path, run_name, "step_000010"))
    return sum(i.size for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.File)


def tiny_inputs(root: str) -> tuple[str, str]:
    """tinyshakespeare (shipped with the tests) as shards, and a 4096-token tokenizer trained on it."""
    from raychat.data.shards import prepare
    from raychat.tokenizer import Tokenizer

    text_path = os.path.join(root, "tinyshakespeare.txt")
    with gzip.open(os.path.join(REPO, "tests", "data", "tinyshakespeare.txt.gz"), "rb") as f, open(text_path, "wb") as o:
        o.write(f.read())
    data_dir, tok_dir = os.path.join(root, "data"), os.path.join(root, "tokenizer")
    prepare(text_path, data_dir, rows_per_group=64, shard_chars=200_000, val_fraction=0.1, progress=False)
    with open(text_path, encoding="utf-8") as f:
        Tokenizer.train_from_iterator(iter([f.read()]), 4096).save(tok_dir)
    return data_dir, tok_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=12, help="the reference model whose checkpoint is persisted")
    p.add_argument("--loop-depth", type=int, default=8, help="the model the step loop trains (vocab 4096, T 256)")
    p.add_argument("--loop-steps", type=int, default=30)
    p.add_argument("--parts", nargs="+", default=["persist", "loop"], choices=["persist", "loop"])
    a = p.parse_args(argv)

    from tests._s3 import BUCKET, S3Server

    server = S3Server()
    os.environ.update(server.env, AWS_ENDPOINT_URL=server.server_url)  # straight to the server, no proxy
    scratch = tempfile.mkdtemp(prefix="bench-storage-")
    try:
        with open("/proc/loadavg") as f:
            print(f"load average at start: {f.read().split()[0]}")
        if "persist" in a.parts:
            r = bench_persist(a.depth, scratch, f"s3://{BUCKET}/bench/d{a.depth}")
            gb = r["bytes"] / 1e9
            print(f"d{r['depth']} checkpoint, 1 rank: {gb:.2f} GB; written locally in {r['write']:.1f} s")
            for name in ("local", "s3"):
                print(f"  persisted to {name:5s} in {r[name]:6.1f} s  ({r['bytes'] / 1e6 / r[name]:.0f} MB/s)")
        if "loop" in a.parts:
            data_dir, tok_dir = tiny_inputs(scratch)
            for name, path in (("local", os.path.join(scratch, "runs")), ("s3", f"s3://{BUCKET}/bench/runs")):
                r = bench_loop(a.loop_depth, a.loop_steps, path, data_dir, tok_dir)
                med = lambda xs: f"{statistics.median(xs):.0f} ms ({len(xs)} steps)" if xs else "-"  # noqa: E731
                print(f"loop d{a.loop_depth} on {name}: checkpoint {r['bytes'] / 1e6:.0f} MB; step dt with an upload "
                      f"behind it {med(r['during'])}, without {med(r['others'])}")
                for saved, written, reported in r["saves"]:
                    print(f"  step {saved}: written and persisted in {written:.2f} s, reported at step {reported}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
