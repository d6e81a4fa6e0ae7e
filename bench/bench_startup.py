"""Start-up: seconds from the command to the first training step, and where they go.

    python -m bench.bench_startup [--repeats 2] [--dry-run]

Launches `python -m raychat.train ...` (d4 on tinyshakespeare, 3 steps, inline data) as a subprocess, stamps
every output line as it arrives, and splits the time at these lines:
- `driver ready`: the driver's "Run <name>: ..." plan line (Python + torch imports, argument parsing,
  preflight: tokenizer, shards, resume check);
- `ray started`:  Ray's "Started a local Ray instance" log line (ray.init of the embedded local cluster);
- `worker up`:    the first line a training worker prints (the loop's "num_layers:" plan line: the Train
  controller, the worker actor, torch.distributed setup and the loop's imports are behind it);
- `first step`:   the "step 00000" line, printed after step 0 completes (model build, data stream start and,
  on a GPU, `torch.compile`: compile time = dt of step 0 - median dt of steps 1.., printed).
The same config run through `LocalSession` in a plain process (no Ray) gives the baseline: its command to
"step 00000" is what Ray adds to.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from bench.bench_train import REPO, STEP_LINE, bench_env, prepare_bench_data, train_args

MARKERS = [("driver ready", re.compile(r"^Run \S+: \d+ steps")),
           ("ray started", re.compile(r"Started a local Ray instance")),
           # The driver prints the same plan lines indented by two spaces; the worker's are not (Ray prefixes them
           # with "(RayTrainWorker pid=...)").
           ("worker up", re.compile(r"^(?! ).*num_layers: \d+")),
           ("first step", re.compile(r"step 00000/"))]


def timed_lines(cmd: list[str], timeout: float) -> list[tuple[float, str]]:
    """Run `cmd`, returning (seconds since launch, line) for each line of its merged stdout/stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines = []
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"{cmd[:3]} ran past {timeout} s")
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (rc {rc}):\n" + "\n".join(l for _, l in lines[-40:]))
    return lines


def milestones(lines) -> dict:
    found = {}
    for t, line in lines:
        for name, rx in MARKERS:
            if name not in found and rx.search(line):
                found[name] = t
    dts = {int(m.group(1)): float(m.group(2)) / 1000 for _, l in lines for m in [STEP_LINE.search(l)] if m}
    found["step0 dt"] = dts.get(0, float("nan"))
    later = [d for s, d in dts.items() if s > 0]
    found["later dt"] = statistics.median(later) if later else float("nan")
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--total-batch-size", type=int, default=1024)
    p.add_argument("--window-pattern", default="L")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device-type", default="", help="'' = autodetect (cuda compiles the model)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="interleaved (ray, local) pairs")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "raychat-bench"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    a = p.parse_args(argv)
    if a.steps < 2 or a.repeats < 1:
        p.error(f"--steps {a.steps} must be >= 2 (step 0 against later steps) and --repeats {a.repeats} >= 1")
    print(f"settings: {vars(a)}")
    if a.dry_run:
        return 0
    data_dir, tok_dir = prepare_bench_data(a.cache_dir)
    storage = tempfile.mkdtemp(prefix="raychat-bench-startup-")
    print(f"load average before: {os.getloadavg()}")
    results = {"ray": [], "local": []}
    for i in range(a.repeats):
        for kind in (("ray", "local") if i % 2 == 0 else ("local", "ray")):
            args = train_args(a, data_dir, tok_dir, storage, f"startup-{kind}-{i}") + ["--data-backend", "inline"]
            cmd = ([sys.executable, "-m", "raychat.train", *args] if kind == "ray" else
                   [sys.executable, "-m", "bench.bench_train", "--child-local", "--", *args])
            m = milestones(timed_lines(cmd, a.timeout))
            results[kind].append(m)
            print(f"  {kind:5s} run {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in m.items()) +
                  f" | load {os.getloadavg()[0]:.1f}", flush=True)

    def med(kind, key):
        vals = [r[key] for r in results[kind] if key in r]
        return statistics.median(vals) if vals else float("nan")

    ray_first, local_first = med("ray", "first step"), med("local", "first step")
    t_driver, t_ray, t_worker = med("ray", "driver ready"), med("ray", "ray started"), med("ray", "worker up")
    step0 = med("ray", "step0 dt")
    print("\nraychat.train, command -> first step (median of runs):")
    print(f"  imports + preflight (driver ready)       {t_driver:7.2f} s")
    print(f"  ray.init (local cluster)                 {t_ray - t_driver:7.2f} s")
    print(f"  Train controller + worker + loop imports {t_worker - t_ray:7.2f} s")
    print(f"  model, data, step 0                      {ray_first - t_worker:7.2f} s  (step 0 itself {step0:.2f} s)")
    print(f"  total                                    {ray_first:7.2f} s")
    print(f"without Ray (LocalSession): {local_first:.2f} s; Ray adds {ray_first - local_first:.2f} s "
          f"(ratio {ray_first / local_first:.2f}x)")
    compile_s = step0 - med("ray", "later dt")
    print(f"step 0 - median later step = {compile_s:.2f} s ({100 * compile_s / ray_first:.0f}% of start-up): "
          "torch.compile on CUDA, first-touch allocation on CPU (the loop does not compile on CPU)")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
