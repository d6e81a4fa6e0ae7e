"""Training throughput: raychat on Ray Train against the same loop without Ray, and 2 workers against 1.

    python -m bench.bench_train [--depth 4] [--steps 30] [--repeats 2] [--dry-run]

Every run is a fresh process running the real loop (`raychat.loop.train`) on the same config and data:
- `local`:  `LocalSession` in a plain Python process (no Ray anywhere: the baseline);
- `ray1`:   `python -m raychat.train --num-workers 1` (Ray Train, one worker);
- `ray2`:   the same with `--num-workers 2` (twice the workers, the same global batch: A halves);
- `ray1-raydata`: `ray1` with `--data-backend ray` (tokens from a Ray Data actor pool).
All but the last use `--data-backend inline`, so the only difference between `local` and `ray1` is Ray.
Runs are interleaved (local, ray1, local, ray1, ...) so machine-load drift hits both sides alike.

Throughput comes from the step lines the loop prints (`dt` per step, measured around the step exactly as the
reference does), over steps 11..N (the loop's own `total_training_time` window, docs/REFERENCE.md §10: steps
0-10 are compile warm-up). Printed: tokens/sec from the summed dt and from the median dt (robust to a load
spike), the ratios ray1/local (target >= 0.98) and ray2/(2 x ray1) (scaling efficiency), and MFU where the
loop can compute it (CUDA: the loop knows the GPU's peak; on CPU it prints 0).

On a GPU node pass `--device-type cuda` and a bigger model (`--depth 12 --max-seq-len 2048 --device-batch-size
32 --total-batch-size 524288`, the reference's d12): the loop then compiles, runs bf16 autocast and prints MFU.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# Ray's loopback/test settings (tests/conftest.py _TEST_ENV), applied to every process this script starts.
BENCH_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in BENCH_ENV.items():
    os.environ.setdefault(_k, _v)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
STEP_LINE = re.compile(r"step (\d+)/\d+ .*?\| dt: ([\d.]+)ms \| tok/sec: [\d,]+ \| mfu: ([\d.]+)")


def bench_env() -> dict:
    env = dict(os.environ)
    for k, v in BENCH_ENV.items():
        env.setdefault(k, v)
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="raybench"))
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def prepare_bench_data(root: str, vocab_size: int = 4096) -> tuple[str, str]:
    """tinyshakespeare as shards (64-doc row groups, as tests/conftest.py) and a tokenizer, cached in `root`
    (carry a prepared `root` to a machine without ../shared, e.g. scripts/gpu_check.sh). Returns (data_dir,
    tokenizer_dir)."""
    from raychat.data.shards import iter_source_docs, prepare, source_files
    from raychat.tokenizer import Tokenizer

    data_dir, tok_dir = os.path.join(root, "data"), os.path.join(root, f"tokenizer_{vocab_size}")
    if os.path.exists(os.path.join(data_dir, "val.parquet")) and os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")):
        return data_dir, tok_dir
    if not os.path.exists(SHAKESPEARE):
        raise FileNotFoundError(f"{SHAKESPEARE} is missing: the benchmarks train on tinyshakespeare from ../shared/data "
                                f"(or pass --cache-dir with data/ and tokenizer_{vocab_size}/ prepared elsewhere)")
    if not os.path.exists(os.path.join(data_dir, "val.parquet")):
        prepare(SHAKESPEARE, data_dir, rows_per_group=64, shard_chars=200_000, val_fraction=0.1, progress=False,
                overwrite=True)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.pkl")):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            texts = [f.read()]
        if vocab_size > 16_384:  # tinyshakespeare runs out of merges at ~22k tokens: add the offline stdlib corpus
            texts += [doc for _, doc in iter_source_docs(source_files("stdlib"), "file", [0])]
        tokenizer = Tokenizer.train_from_iterator(iter(texts), vocab_size)
        if tokenizer.get_vocab_size() != vocab_size:
            raise RuntimeError(f"the bench tokenizer reached {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
        tokenizer.save(tok_dir)
    return data_dir, tok_dir


def train_args(a, data_dir: str, tok_dir: str, storage: str, run_name: str) -> list[str]:
    """The raychat.train flags shared by every run: no eval, no CORE, no samples, no checkpoints."""
    args = ["--depth", str(a.depth), "--max-seq-len", str(a.max_seq_len), "--device-batch-size",
            str(a.device_batch_size), "--total-batch-size", str(a.total_batch_size), "--window-pattern",
            a.window_pattern, "--num-iterations", str(a.steps), "--eval-every", "-1", "--core-metric-every", "-1",
            "--sample-every", "-1", "--save-every", "-1", "--data-dir", data_dir, "--tokenizer-dir", tok_dir,
            "--storage-path", storage, "--run-name", run_name, "--cpus-per-worker", str(a.threads)]
    if a.device_type:
        args += ["--device-type", a.device_type]
    return args


def run_local(argv: list[str]) -> int:
    """Child process: the loop in this process through LocalSession, no Ray imported by the loop's path."""
    from raychat.config import parse_args
    from raychat.loop import train
    from raychat.session import LocalSession

    cfg = parse_args(argv).resolve_paths()
    summary = train(cfg, LocalSession(cfg))
    print(f"Total training time (s): {summary['total_training_time']:.4f}", flush=True)
    return 0


def run_one(kind: str, a, data_dir, tok_dir, storage, i: int) -> dict:
    """One fresh-process run; returns its per-step dt (s) and mfu of steps 11.. and its wall time."""
    name = f"{kind}-{i}-{int(time.time() * 1000)}"
    args = train_args(a, data_dir, tok_dir, storage, name)
    if kind == "local":
        cmd = [sys.executable, "-m", "bench.bench_train", "--child-local", "--", *args, "--data-backend", "inline"]
    else:
        workers = "2" if kind == "ray2" else "1"
        backend = "ray" if kind == "ray1-raydata" else "inline"
        cmd = [sys.executable, "-m", "raychat.train", *args, "--num-workers", workers, "--data-backend", backend]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=a.timeout)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed (rc {proc.returncode}):\n{out[-3000:]}")
    steps = {}
    for m in STEP_LINE.finditer(out):
        steps[int(m.group(1))] = (float(m.group(2)) / 1000, float(m.group(3)))
    timed = [steps[s] for s in sorted(steps) if s > 10]
    if len(timed) < 3:
        raise RuntimeError(f"{kind}: found {len(timed)} timed step lines (need --steps >= 14):\n{out[-3000:]}")
    return {"dt": [d for d, _ in timed], "mfu": [m for _, m in timed], "wall": wall}


def summarise(runs: list[dict], tokens_per_step: int) -> dict:
    dts = [d for r in runs for d in r["dt"]]
    return {"tok_s_sum": tokens_per_step * len(dts) / sum(dts), "tok_s_median": tokens_per_step / statistics.median(dts),
            "mfu": statistics.median(m for r in runs for m in r["mfu"]), "wall": statistics.mean(r["wall"] for r in runs),
            "steps": len(dts)}


# A GPU node's appetite for tokens (order of magnitude, from nanochat's d20/d24 speedrun logs on 8xH100):
# packed tokens per second per GPU, and tokens per micro-batch per GPU (B 32 x T 2048 at d20, B 16 at d24).
GPU_NODE_MODEL = {"d20": (125_000, 32 * 2048), "d24": (75_000, 16 * 2048)}


def bench_stall(a, data_dir: str, tok_dir: str, step_s: float, batches: int) -> None:
    """How long each step waits in next(stream) when a step of `step_s` seconds runs between two batches.

    inline: the worker tokenizes in next() (the reference's loader), so the whole read+tokenize+pack cost is
    waiting; ray: Ray Data actors tokenize during the step, next() only packs. The compute is a sleep, so this
    is the wait alone, not the CPU contention of a CPU-only run (bench_train's throughput rows include that).
    """
    import ray

    from raychat.data.shards import split_shards
    from raychat.data.stream import PackedStream

    files, _ = split_shards(data_dir)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    tokens = a.device_batch_size * a.max_seq_len
    print(f"\ndata stall: B {a.device_batch_size} x T {a.max_seq_len}, a step of {step_s * 1000:.0f} ms between batches, "
          f"{batches} batches after the first")
    rate = {}
    for backend in ("inline", "ray"):
        with PackedStream(files, tok_dir, a.device_batch_size, a.max_seq_len, backend=backend) as stream:
            t0 = time.perf_counter()
            next(stream)
            first = time.perf_counter() - t0
            waits, cpu = [], 0.0
            for _ in range(batches):
                time.sleep(step_s)
                t0, c0 = time.perf_counter(), time.process_time()
                next(stream)
                waits.append(time.perf_counter() - t0)
                cpu += time.process_time() - c0
        waits.sort()
        rate[backend] = tokens * batches / max(cpu, 1e-9)
        print(f"  {backend:6s}: first batch {first:.2f} s; wait per step median {statistics.median(waits) * 1000:.1f} ms, "
              f"p95 {waits[int(0.95 * (len(waits) - 1))] * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms "
              f"= {100 * statistics.median(waits) / step_s:.1f}% of the step; worker CPU {cpu / batches * 1000:.1f} ms/batch "
              f"({rate[backend] / 1e6:.2f} M tok per worker CPU-second)", flush=True)
    ray.shutdown()
    for name, (tok_s, micro) in GPU_NODE_MODEL.items():
        step = micro / tok_s
        print(f"  modelled GPU {name}: {tok_s:,} tok/s per GPU, {micro:,}-token micro-batch every {step * 1000:.0f} ms; "
              f"worker CPU per batch inline {micro / rate['inline'] * 1000:.0f} ms, ray {micro / rate['ray'] * 1000:.0f} ms "
              f"-> stall 0 while that is < {step * 1000:.0f} ms (the CPU works while the GPU runs the queued step)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--total-batch-size", type=int, default=2048, help="must be divisible by B x T x 2 for ray2")
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--vocab-size", type=int, default=4096, help="of the bench tokenizer (the reference: 32768)")
    p.add_argument("--steps", type=int, default=30, help="steps per run; 11.. are timed")
    p.add_argument("--repeats", type=int, default=2, help="interleaved local/ray1 pairs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (--cpus-per-worker)")
    p.add_argument("--device-type", default="", help="'' = autodetect (cuda when present)")
    p.add_argument("--kinds", nargs="+", default=["local", "ray1", "ray2", "ray1-raydata"],
                   choices=["local", "ray1", "ray2", "ray1-raydata"])
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "raychat-bench"))
    p.add_argument("--timeout", type=int, default=900, help="seconds per run before it counts as failed")
    p.add_argument("--stall-batches", type=int, default=40, help="batches for the data-stall part; 0 skips it")
    p.add_argument("--stall-step-ms", type=float, default=0, help="step time for the stall part; 0 = measured median")
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    p.add_argument("--child-local", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_local:
        return run_local(a.rest)
    if a.vocab_size < 256:
        p.error(f"--vocab-size {a.vocab_size}: must be >= 256 (the byte tokens)")
    if a.steps < 14:
        p.error(f"--steps {a.steps}: need at least 14 (steps 0-10 are warm-up, 3 timed steps minimum)")
    if a.total_batch_size % (a.device_batch_size * a.max_seq_len * 2):
        p.error(f"--total-batch-size {a.total_batch_size} must be divisible by 2 x B x T = "
                f"{2 * a.device_batch_size * a.max_seq_len} so that 1 and 2 workers run the same global batch")
    print(f"settings: {vars(a)}")
    if a.dry_run:
        return 0

    data_dir, tok_dir = prepare_bench_data(a.cache_dir, a.vocab_size)
    storage = tempfile.mkdtemp(prefix="raychat-bench-runs-")
    print(f"load average before: {os.getloadavg()}")
    order = []
    pair = [k for k in ("local", "ray1") if k in a.kinds]
    for i in range(a.repeats):
        order += [(k, i) for k in (pair if i % 2 == 0 else pair[::-1])]  # A B B A: drift cancels to first order
    order += [(k, 0) for k in ("ray2", "ray1-raydata") if k in a.kinds]
    results: dict[str, list] = {}
    if not order:
        print("no throughput runs (--kinds/--repeats)")
    for kind, i in order:
        r = run_one(kind, a, data_dir, tok_dir, storage, i)
        results.setdefault(kind, []).append(r)
        print(f"  {kind:13s} run {i}: median dt {statistics.median(r['dt']) * 1000:8.1f} ms over {len(r['dt'])} "
              f"steps, wall {r['wall']:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    s = {k: summarise(v, a.total_batch_size) for k, v in results.items()}
    print(f"\n{'run':14s} {'tok/s (sum dt)':>15s} {'tok/s (median)':>15s} {'mfu %':>7s} {'wall s':>7s}")
    for k, v in s.items():
        print(f"{k:14s} {v['tok_s_sum']:15,.0f} {v['tok_s_median']:15,.0f} {v['mfu']:7.2f} {v['wall']:7.1f}")
    if "local" in s and "ray1" in s:
        print(f"ray1 / local (Ray overhead, target >= 0.98): sum {s['ray1']['tok_s_sum'] / s['local']['tok_s_sum']:.3f}, "
              f"median {s['ray1']['tok_s_median'] / s['local']['tok_s_median']:.3f}")
    if "ray2" in s and "ray1" in s:
        print(f"ray2 / (2 x ray1) (scaling efficiency): sum {s['ray2']['tok_s_sum'] / (2 * s['ray1']['tok_s_sum']):.3f}, "
              f"median {s['ray2']['tok_s_median'] / (2 * s['ray1']['tok_s_median']):.3f}")
    if "ray1-raydata" in s and "ray1" in s:
        print(f"ray1 with Ray Data / ray1 inline: median {s['ray1-raydata']['tok_s_median'] / s['ray1']['tok_s_median']:.3f}")
    if a.stall_batches:
        step_s = a.stall_step_ms / 1000 or (a.device_batch_size * a.max_seq_len / s["local"]["tok_s_median"]
                                            if "local" in s else 0.5)
        bench_stall(a, data_dir, tok_dir, step_s, a.stall_batches)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
