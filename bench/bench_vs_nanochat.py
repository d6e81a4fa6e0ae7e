"""raychat against nanochat (the reference, run in its own venv) on the same CPU, data, tokenizer and config.

    python -m bench.bench_vs_nanochat --nanochat-dir ../shared/peers/nanochat-07c4dd4 \\
        [--peer-python /tmp/nanochat-venv/bin/python] [--depths 4 6 8] [--steps 40] [--repeats 1] [--cold]
        [--layouts] [--local] [--dry-run]

This benchmark runs the peer, which is not part of this repository: a nanochat 07c4dd4 checkout
(`--nanochat-dir`; the default is ../shared/peers/nanochat-07c4dd4, where this project's workspace keeps it)
and a venv for it: `python3 -m venv /tmp/nanochat-venv && /tmp/nanochat-venv/bin/pip
install torch==2.13.0 tiktoken rustbpe pyarrow numpy wandb requests filelock psutil tokenizers regex`.

Each run is a fresh process with the flags a user would type: nanochat `python -m scripts.base_train
--device-type=cpu --run=dummy ...` from its root, raychat `python -m raychat.train --num-workers 1 ...` (its
defaults: an embedded local Ray, --cpus-per-worker auto, --compile auto, Ray Data tokenization). Config as
issue 13: head-dim 64, window L (--window-pattern), T 256, B 8, total batch 2048, vocab 4096 (tinyshakespeare's tokenizer, from
bench_train's data preparation), no eval/CORE/samples, a checkpoint only at the end. Per depth the two run
interleaved (A B A B); printed per run and as raychat/nanochat ratios:
- tok/s: total batch / median dt of steps 11..N-1, from the step lines both print;
- start-up: wall seconds from the launch to the step-0 line (imports, Ray, model build, compile, step 0);
- peak RSS: of the training process (nanochat's process; raychat's Ray Train worker) and of the whole
  process tree (raychat's includes the local Ray's GCS, raylet, dashboard and data actors), from /proc;
- the train loss printed at the last step (the same data and init: the two should agree closely).
Compile caches: by default both sides share one fresh TORCHINDUCTOR_CACHE_DIR, primed by a 1-step run per
side and depth whose start-up is reported as the cold one; the timed runs are warm. `--cold` gives every
timed run a fresh cache instead (every start-up cold). `--layouts` adds the quickstart's question: at the
first depth and total batch 4096, 2 workers x 1 CPU against 1 worker x 2 CPUs (raychat only). `--local` adds a
third side, raychat's own loop with no Ray (bench_train's LocalSession child, tokenizing inline): it splits a
gap into the loop's part (local / nanochat) and Ray's part (raychat / local).
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

_OMP_BEFORE = os.environ.get("OMP_NUM_THREADS")
from bench.bench_train import REPO, prepare_bench_data  # noqa: E402  (it sets the bench env at import)
from bench import peers
from bench.machine import cpu_description

if _OMP_BEFORE is None:  # bench_train pins 1 thread per process; here each side sizes its own threads
    os.environ.pop("OMP_NUM_THREADS", None)

STEP = re.compile(r"step (\d+)/(\d+) \(.*?\) \| loss: ([\d.]+) .*?\| dt: ([\d.]+)ms")
VAL_BPB = re.compile(r"Step (\d+) \| Validation bpb: ([\d.]+)")
# The peers this benchmark knows, and the raychat recipe that trains what each trains. 92d63d4 is told apart by
# the file it added (nanochat/fp8.py).
RECIPE_OF_PEER = {"07c4dd4": "seed", "92d63d4": "2026-07"}


def write_peer_layout(data_dir: str, tok_dir: str, base: str, peer: str = "07c4dd4") -> None:
    """DIR/base_data/shard_XXXXX.parquet (92d63d4: DIR/base_data_climbmix/; the last one sorting is the peer's val
    shard: ours) and DIR/tokenizer. Same files, renamed: column `text`, 64-document row groups, which the peer reads
    group by group."""
    shards = sorted(f for f in os.listdir(data_dir) if f.startswith("shard_") and f.endswith(".parquet"))
    out = os.path.join(base, "base_data_climbmix" if peer == "92d63d4" else "base_data")
    os.makedirs(out, exist_ok=True)
    for i, name in enumerate(shards + ["val.parquet"]):
        shutil.copyfile(os.path.join(data_dir, name), os.path.join(out, f"shard_{i:05d}.parquet"))
    os.makedirs(os.path.join(base, "tokenizer"), exist_ok=True)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        shutil.copyfile(os.path.join(tok_dir, name), os.path.join(base, "tokenizer", name))


def _rss_tree(root: int) -> tuple[int, dict]:
    """(sum of RSS bytes over root and its descendants, {pid: (rss, cmdline)}), from /proc."""
    parent, info = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            info[pid] = (rss, cmd)
        except OSError:
            continue
    return sum(r for r, _ in info.values()), info


def run(cmd: list[str], cwd: str, env: dict, timeout: float, trainer_match: str | None, log_path: str,
        echo: bool = False) -> dict:
    """Launch, timestamp each output line into `log_path` (and stdout with `echo`), poll memory every 0.25 s.
    `trainer_match`: a cmdline substring that names the training process inside the tree (None: the launched
    process itself)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    peak = {"tree": 0, "trainer": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            total, info = _rss_tree(proc.pid)
            peak["tree"] = max(peak["tree"], total)
            mine = [r for pid, (r, c) in info.items() if (trainer_match in c if trainer_match else pid == proc.pid)]
            peak["trainer"] = max([peak["trainer"], *mine])
            done.wait(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    lines, first_step, steps, val_bpb = [], None, {}, None
    log = open(log_path, "w")
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            log.write(f"{time.perf_counter() - t0:8.2f} {line}")
            if echo:
                print(f"    | {line}", end="", flush=True)
            if v := VAL_BPB.search(line):
                val_bpb = float(v.group(2))  # the last evaluation's
            m = STEP.search(line)
            if m:
                steps[int(m.group(1))] = (float(m.group(4)) / 1000, float(m.group(3)))
                if first_step is None:
                    first_step = time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{' '.join(cmd[:4])} ran past {timeout} s")
        rc = proc.wait(timeout=60)
    finally:
        log.close()
        done.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0 or not steps:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (rc {rc}):\n" + "\n".join(lines[-40:]))
    n = max(steps)
    timed = [steps[s][0] for s in sorted(steps) if 10 < s < n] or [steps[s][0] for s in sorted(steps)]
    return {"dt": statistics.median(timed), "startup": first_step, "loss": steps[n][1], "wall": time.perf_counter() - t0,
            "rss_trainer": peak["trainer"], "rss_tree": peak["tree"], "last_step": n, "val_bpb": val_bpb,
            "lines": lines}


def model_flags(a, depth: int, total_batch: int, steps: int) -> list[str]:
    """The flags both sides take. --eval-tokens N evaluates val bpb at step 0 and at the last step."""
    evals = ["--eval-every", str(steps), "--eval-tokens", str(a.eval_tokens)] if a.eval_tokens > 0 and steps > 1 \
        else ["--eval-every", "-1"]
    return ["--depth", str(depth), "--head-dim", "64", "--window-pattern", a.window_pattern,
            "--max-seq-len", str(a.max_seq_len),
            "--device-batch-size", str(a.device_batch_size), "--total-batch-size", str(total_batch),
            "--num-iterations", str(steps), *evals, "--core-metric-every", "-1", "--sample-every", "-1"]


def recipe_flags(a) -> list[str]:
    """raychat's flags for the recipe the peer trains, and (92d63d4) the compute dtype the peer is given."""
    if a.peer == "07c4dd4":
        return []
    return ["--recipe", RECIPE_OF_PEER[a.peer], "--compute-dtype", a.dtype]


class Runner:
    def __init__(self, a, work: str, data_dir: str, tok_dir: str, peer_base: str):
        self.a, self.work, self.data_dir, self.tok_dir, self.peer_base = a, work, data_dir, tok_dir, peer_base
        self.shared_cache = a.inductor_dir or os.path.join(work, "inductor-shared")
        self.n = 0

    def _log(self, name: str) -> str:
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        return os.path.join(self.work, "logs", f"{self.n:02d}-{name}.log")

    def _cache(self, cold: bool) -> str:
        self.n += 1
        return os.path.join(self.work, f"inductor-{self.n}") if cold else self.shared_cache

    def nanochat(self, depth: int, steps: int, cold: bool) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(NANOCHAT_BASE_DIR=self.peer_base, TORCHINDUCTOR_CACHE_DIR=self._cache(cold), WANDB_MODE="disabled")
        if self.a.peer == "92d63d4":  # its compute-dtype override
            env["NANOCHAT_DTYPE"] = {"fp32": "float32", "bf16": "bfloat16"}[self.a.dtype]
        cmd = [self.a.peer_python, "-m", "scripts.base_train", *model_flags(self.a, depth, self.a.total_batch_size, steps),
               "--device-type=cpu", "--run=dummy"]
        return run(cmd, self.a.nanochat_dir, env, self.a.timeout, None, self._log(f"nanochat-d{depth}"))

    def _raychat_env(self, cold: bool) -> dict:
        from bench.bench_train import bench_env

        env = bench_env()
        if _OMP_BEFORE is None:
            env.pop("OMP_NUM_THREADS", None)
        env["TORCHINDUCTOR_CACHE_DIR"] = self._cache(cold)
        return env

    def raychat(self, depth: int, steps: int, cold: bool, workers: int = 1, total_batch: int | None = None) -> dict:
        env = self._raychat_env(cold)
        cmd = [sys.executable, "-m", "raychat.train", "--num-workers", str(workers),
               *model_flags(self.a, depth, total_batch or self.a.total_batch_size, steps), *recipe_flags(self.a),
               "--data-dir", self.data_dir, "--tokenizer-dir", self.tok_dir,
               "--storage-path", os.path.join(self.work, "runs"), "--run-name", f"vs-d{depth}-{self.n}", *self.a.raychat_args]
        return run(cmd, REPO, env, self.a.timeout, "RayTrainWorker", self._log(f"raychat-d{depth}-w{workers}"))

    def local(self, depth: int, steps: int, cold: bool) -> dict:
        """raychat's loop in a plain process (no Ray): the same flags, data and threads as `raychat`."""
        env = self._raychat_env(cold)
        cmd = [sys.executable, "-m", "bench.bench_train", "--child-local", "--",
               *model_flags(self.a, depth, self.a.total_batch_size, steps), *recipe_flags(self.a),
               "--data-dir", self.data_dir, "--tokenizer-dir", self.tok_dir, "--data-backend", "inline",
               "--storage-path", os.path.join(self.work, "runs"), "--run-name", f"local-d{depth}-{self.n}", *self.a.raychat_args]
        return run(cmd, REPO, env, self.a.timeout, None, self._log(f"local-d{depth}"))


def describe(name: str, r: dict, tokens: int) -> str:
    val = "" if r["val_bpb"] is None else f" | val bpb {r['val_bpb']:.6f}"
    return (f"  {name:22s} tok/s {tokens / r['dt']:7,.0f} (median dt {r['dt'] * 1000:7.1f} ms) | start-up {r['startup']:6.1f} s"
            f" | peak RSS trainer {r['rss_trainer'] / 2**20:6.0f} MiB, tree {r['rss_tree'] / 2**20:6.0f} MiB | "
            f"loss@{r['last_step']} {r['loss']:.4f}{val} | wall {r['wall']:5.1f} s | load {os.getloadavg()[0]:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peers.add_arguments(p, "07c4dd4")  # 07c4dd4 runs against the seed recipe, 92d63d4 against --recipe 2026-07
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--steps", type=int, default=40, help="steps per run; the median dt of 11..N-1 is timed")
    p.add_argument("--repeats", type=int, default=1, help="interleaved nanochat/raychat pairs per depth")
    p.add_argument("--cold", action="store_true", help="a fresh TORCHINDUCTOR_CACHE_DIR for every timed run")
    p.add_argument("--no-prime", action="store_true", help="skip the 1-step cache-priming runs (warm mode)")
    p.add_argument("--inductor-dir", default="", help="the shared compile cache of warm mode (default: a fresh one); "
                   "an earlier run's, with --no-prime, times warm runs without priming again")
    p.add_argument("--layouts", action="store_true", help="also raychat 2 workers x 1 CPU vs 1 worker x 2 CPUs")
    p.add_argument("--local", action="store_true", help="also raychat's loop without Ray (splits loop from Ray cost)")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--window-pattern", default="L", help="L (issue 13's config) or the reference's default SSSL, "
                   "where sliding-window layers meet each side's attention path (see --max-seq-len 2048)")
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--total-batch-size", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="92d63d4 only: the compute dtype of both sides (nanochat's NANOCHAT_DTYPE, raychat's "
                        "--compute-dtype); fp32 is the peer's own choice on CPU")
    p.add_argument("--eval-tokens", type=int, default=0,
                   help="evaluate val bpb at step 0 and the last step on this many tokens (0 = no evaluation)")
    p.add_argument("--raychat-args", nargs=argparse.REMAINDER, default=[],
                   help="extra raychat.train flags, last on the line (e.g. --raychat-args --compile false)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "raychat-bench"),
                   help="bench_train's prepared shards and tokenizer")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="check the inputs, print the plan, run nothing")
    a = p.parse_args(argv)
    a.nanochat_dir = os.path.abspath(a.nanochat_dir)
    if (why := peers.problem(a.nanochat_dir, os.path.join("scripts", "base_train.py"), a.peer_python)) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if a.steps < 14:
        p.error(f"--steps {a.steps}: need at least 14 (steps 0-10 are warm-up)")
    a.peer = peers.version_of(a.nanochat_dir)
    if a.peer == "07c4dd4" and a.dtype != "fp32":
        p.error("--dtype applies to nanochat 92d63d4 (07c4dd4 computes in fp32 on CPU)")
    print(f"CPU: {cpu_description()}")
    print(f"peer: nanochat {a.peer} = raychat --recipe {RECIPE_OF_PEER[a.peer]}")
    print(f"settings: {vars(a)}")
    if a.dry_run:
        return 0

    work = tempfile.mkdtemp(prefix="raychat-vs-nanochat-")
    data_dir, tok_dir = prepare_bench_data(a.cache_dir, a.vocab_size)
    peer_base = os.path.join(work, "nanochat_base")
    write_peer_layout(data_dir, tok_dir, peer_base, a.peer)
    r = Runner(a, work, data_dir, tok_dir, peer_base)
    tokens = a.total_batch_size
    print(f"work dir {work} (each run's timestamped output in logs/); load average before: {os.getloadavg()}", flush=True)
    summary = {}
    for depth in a.depths:
        print(f"\n--- d{depth} ---", flush=True)
        sides = ("nanochat", "raychat", "local") if a.local else ("nanochat", "raychat")
        res = {k: [] for side in sides for k in (side, f"{side} cold")}
        if not a.cold and not a.no_prime:  # the first compile of these shapes, into the shared cache: cold start-up
            for side in sides:
                res[f"{side} cold"].append(getattr(r, side)(depth, 1, cold=False))
                print(f"  {side} prime (1 step, cold cache): start-up {res[f'{side} cold'][-1]['startup']:.1f} s", flush=True)
        for i in range(a.repeats):
            for side in (sides if i % 2 == 0 else sides[::-1]):
                out = getattr(r, side)(depth, a.steps, cold=a.cold)
                res[side].append(out)
                print(describe(f"{side} #{i}", out, tokens), flush=True)
        summary[depth] = res
    if a.layouts:
        d, tb = a.depths[0], 2 * a.total_batch_size
        print(f"\n--- layouts: raychat d{d}, total batch {tb}: 1 worker x 2 CPUs vs 2 workers x 1 CPU ---", flush=True)
        lay = {1: [], 2: []}
        for i in range(a.repeats):
            for w in ((1, 2) if i % 2 == 0 else (2, 1)):
                out = r.raychat(d, a.steps, cold=a.cold, workers=w, total_batch=tb)
                lay[w].append(out)
                print(describe(f"{w} worker(s) #{i}", out, tb), flush=True)
        t1, t2 = (statistics.median(x["dt"] for x in lay[w]) for w in (1, 2))
        print(f"  2 workers / 1 worker, tok/s: {t1 / t2:.3f}")

    med = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
    print(f"\n{'':6s}{'tok/s nanochat':>15s}{'raychat':>9s}{'ratio':>7s} | {'start-up s n/r (ratio)':>24s} | "
          f"{'cold start-up s n/r':>20s} | {'peak RSS MiB n / r worker / r tree':>36s} | {'last loss n/r':>15s}")
    for depth, res in summary.items():
        n, ry = res["nanochat"], res["raychat"]
        ts_n, ts_r = tokens / med(n, "dt"), tokens / med(ry, "dt")
        su_n, su_r = med(n, "startup"), med(ry, "startup")
        cold = (f"{med(res['nanochat cold'], 'startup'):6.1f}/{med(res['raychat cold'], 'startup'):6.1f}"
                if res["nanochat cold"] else "(not primed)")
        print(f"d{depth:<5d}{ts_n:15,.0f}{ts_r:9,.0f}{ts_r / ts_n:7.2f} | {su_n:7.1f}/{su_r:6.1f} ({su_r / su_n:5.2f}x) | "
              f"{cold:>20s} | {med(n, 'rss_trainer') / 2**20:8.0f} / {med(ry, 'rss_trainer') / 2**20:8.0f} / "
              f"{med(ry, 'rss_tree') / 2**20:8.0f}       | {med(n, 'loss'):.4f}/{med(ry, 'loss'):.4f}")
        if n[0]["val_bpb"] is not None and ry[0]["val_bpb"] is not None:
            vn, vr = med(n, "val_bpb"), med(ry, "val_bpb")
            print(f"{'':6s}val bpb at step {n[0]['last_step']}: nanochat {vn:.6f}, raychat {vr:.6f} "
                  f"({100 * (vr - vn) / vn:+.2f}%)")
        if res.get("local"):
            lo = res["local"]
            ts_l = tokens / med(lo, "dt")
            print(f"{'':6s}raychat without Ray: tok/s {ts_l:,.0f} = {ts_l / ts_n:.2f}x nanochat (the loop), raychat on Ray "
                  f"= {ts_r / ts_l:.2f}x it (Ray's part) | start-up {med(lo, 'startup'):.1f} s | peak RSS "
                  f"{med(lo, 'rss_trainer') / 2**20:.0f} MiB | loss {med(lo, 'loss'):.4f}")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
