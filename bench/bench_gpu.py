"""raychat on a CUDA GPU beside nanochat 07c4dd4: the measurements of scripts/gpu_check.sh (no Ray needed).

    python -m bench.bench_gpu [--parts mfu fp8 fit] [--patterns SSSL L] [--steps 16] [--cache-dir .gpu]
        [--nanochat-dir .gpu/nanochat-07c4dd4] [--peer-site .gpu/peer_site] [--device-type cuda]

Every run is a fresh process; its output goes to stdout as it comes (a run cut short still shows where it got).
Every part trains on the same data: the bench tokenizer's 32768 tokens (bench_train.prepare_bench_data) over
FineWeb-sized documents (`long_doc_shards`, the default `--docs long`).
- `mfu`: the reference's d12 (T 2048, B 32, total batch 2^19 = 8 micro-batches on one GPU, head dim 128) for
  each window pattern of --patterns, nanochat's own `scripts/base_train`
  and raychat's loop (bench_train's LocalSession child: the step code that runs under Ray), alternately. Both
  compiled, OMP_NUM_THREADS=1 (torchrun's setting), the same allocator setting (PYTORCH_ALLOC_CONF, set by
  gpu_check.sh) and TORCH_LOGS=recompiles. Per run: median dt of steps 11..N-1, tok/s, each side's own MFU
  (both use 989 TFLOP/s for an H100/H200), peak memory, recompiles after the first step line, raychat's data
  wait, and the attention path each side prints.
- `fp8`: raychat `--recipe 2026-07` at d12 (T 2048, B 32, total batch 2^17), bf16 against `--fp8` (--fp8-recipes:
  tensorwise and rowwise): tok/s, MFU, loss at the last step, peak memory. With `--fp8-peer`, nanochat
  92d63d4 (`--nanochat-2026-dir`) at the same flags too, bf16 and `--fp8`.
- `fit`: raychat at d20 (B 32, T 2048, two micro-batches, compiled as training runs: eager, the model keeps
  ~131 GB at its peak on an H200), its peak memory against an 80 GB H100.

The peer runs from a copy of its checkout (`--nanochat-dir`, carried to the GPU machine by gpu_check.sh) with
`--peer-site` on its PYTHONPATH: the GPU image lacks two of its imports, rustbpe (its wheel, unpacked into
.gpu/site, which raychat's tests use too) and wandb, which base_train imports but never calls with --run=dummy
(an empty stand-in in .gpu/peer_site).
"""
import argparse
import os
import re
import statistics
import sys
import tempfile

from bench import peers
from bench.bench_train import REPO, bench_env, prepare_bench_data
from bench.bench_vs_nanochat import STEP, run, write_peer_layout

MFU = re.compile(r"\| mfu: ([\d.]+)")
WAIT = re.compile(r"data wait: ([\d.]+)ms")
PEAK = re.compile(r"Peak memory usage(?: \(host RSS\))?: ([\d.]+)\s*MiB")
STEP0 = re.compile(r"step 0*0/")
ATTENTION = re.compile(r"Attention:|Flash Attention|FA3|SDPA|FlexAttention", re.I)
VOCAB = 32768
H100_MIB = 80 * 1024


def long_doc_shards(root: str, files: int = 4, groups: int = 2, docs: int = 500, chars: int = 4300,
                    seed: int = 0) -> str:
    """`root`/data_long: shards of FineWeb-sized documents (~1,000 tokens: slices of tinyshakespeare of 0.5-1.5 x
    `chars` characters), `groups` row groups of `docs` a file (8 row groups: one for each of the 8 data slots
    of a 2^19-token step on one GPU), and a val shard of the same kind. The data path pays per document, and
    tinyshakespeare's own paragraphs (~35 tokens) would make a fast GPU wait on packing where FineWeb would
    not. Cached: made once."""
    import gzip
    import random

    from bench.bench_data_path import SHAKESPEARE_GZ, write_slices

    out = os.path.join(root, "data_long")
    names = [f"shard_{i:05d}.parquet" for i in range(files)] + ["val.parquet"]
    if all(os.path.exists(os.path.join(out, n)) for n in names):
        return out
    os.makedirs(out, exist_ok=True)
    text = gzip.open(SHAKESPEARE_GZ, "rt", encoding="utf-8").read()
    rng = random.Random(seed)
    for name in names:
        write_slices(os.path.join(out, name), text, groups * docs if name != "val.parquet" else docs // 2, chars,
                     docs, rng)
    return out


def describe(lines: list[str], r: dict, tokens: int) -> dict:
    """The figures of one run from its output lines and bench_vs_nanochat.run's result."""
    first = next((i for i, line in enumerate(lines) if STEP0.search(line)), len(lines))
    # The step lines that run() timed (steps 11..N-1, by their step number), so that dt, MFU and wait agree.
    steps = {int(m.group(1)): line for line in lines if (m := STEP.search(line))}
    timed = [line for s, line in sorted(steps.items()) if 10 < s < max(steps, default=0)] or list(steps.values())
    mfus = [float(m.group(1)) for line in timed if (m := MFU.search(line))]
    waits = [float(m.group(1)) for line in timed if (m := WAIT.search(line))]
    peaks = [float(m.group(1)) for line in lines if (m := PEAK.search(line))]
    return dict(tok_s=tokens / r["dt"], dt_ms=1000 * r["dt"], mfu=statistics.median(mfus) if mfus else float("nan"),
                peak_mib=peaks[-1] if peaks else float("nan"), loss=r["loss"], startup=r["startup"],
                recompiles=sum("Recompiling" in line for line in lines[first + 1:]),
                wait_ms=statistics.median(waits) if waits else None,
                attention=sorted({line.strip()[:160] for line in lines if ATTENTION.search(line)})[:4])


def show(name: str, d: dict) -> None:
    wait = "" if d["wait_ms"] is None else f" | data wait {d['wait_ms']:.1f} ms"
    print(f"  {name:26s} tok/s {d['tok_s']:10,.0f} | dt {d['dt_ms']:8.1f} ms | mfu {d['mfu']:5.2f}% | peak "
          f"{d['peak_mib']:8.0f} MiB | recompiles after step 0: {d['recompiles']} | start-up {d['startup']:5.1f} s | "
          f"loss {d['loss']:.4f}{wait}", flush=True)
    for line in d["attention"]:
        print(f"      attention: {line}")


class Sides:
    def __init__(self, a, work: str, data_dir: str, tok_dir: str):
        self.a, self.work, self.data_dir, self.tok_dir = a, work, data_dir, tok_dir
        self.n = 0

    def _env(self) -> dict:
        env = bench_env()
        env.update(OMP_NUM_THREADS="1", TORCH_LOGS="recompiles",
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(self.work, f"inductor-{self.n}"))
        return env

    def _run(self, name, cmd, cwd, env, tokens) -> dict:
        self.n += 1
        print(f"  -- {name}: {' '.join(cmd[2:])}", flush=True)
        r = run(cmd, cwd, env, self.a.timeout, None, os.path.join(self.work, f"{self.n:02d}-{name}.log"), echo=True)
        d = describe(r["lines"], r, tokens)
        show(name, d)
        return d

    def nanochat(self, flags: list[str], tokens: int, checkout: str, name: str = "nanochat") -> dict:
        """The peer at `checkout` (07c4dd4 or 92d63d4), on this run's data in the layout it reads."""
        peer = peers.version_of(checkout)
        base = os.path.join(self.work, f"nanochat_base_{peer}")
        if not os.path.isdir(base):
            write_peer_layout(self.data_dir, self.tok_dir, base, peer)
        env = self._env()
        env.update(NANOCHAT_BASE_DIR=base)
        env.pop("PYTHONPATH")
        if self.a.device_type == "cuda":  # the GPU image's python; a CPU rehearsal's peer venv has both packages
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(d) for d in self.a.peer_site)
        cmd = [self.a.peer_python, "-m", "scripts.base_train", *flags, f"--device-type={self.a.device_type}",
               "--run=dummy"]
        return self._run(name, cmd, checkout, env, tokens)

    def raychat(self, flags: list[str], tokens: int, name: str = "raychat") -> dict:
        cmd = [sys.executable, "-m", "bench.bench_train", "--child-local", "--", *flags, "--device-type",
               self.a.device_type, "--data-dir", self.data_dir, "--tokenizer-dir", self.tok_dir,
               "--data-backend", "inline", "--storage-path", os.path.join(self.work, "runs"),
               "--run-name", f"{name}-{self.n}"]
        return self._run(name, cmd, REPO, self._env(), tokens)


def shape_flags(a, depth: int, total: int, steps: int, pattern: str) -> list[str]:
    return ["--depth", str(depth), "--max-seq-len", str(a.max_seq_len), "--device-batch-size",
            str(a.device_batch_size), "--total-batch-size", str(total), "--window-pattern", pattern,
            "--num-iterations", str(steps), "--eval-every", "-1", "--core-metric-every", "-1", "--sample-every", "-1"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["mfu", "fp8", "fit"], choices=("mfu", "fp8", "fit"))
    p.add_argument("--patterns", nargs="+", default=["SSSL"], help="window patterns of the mfu part")
    p.add_argument("--steps", type=int, default=16, help="steps per run; the median of steps 11..N-1 is timed")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--fit-depth", type=int, default=20)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=2**19)
    p.add_argument("--fp8-total-batch-size", type=int, default=2**17)
    p.add_argument("--fp8-recipes", nargs="+", default=["tensorwise", "rowwise"], choices=("tensorwise", "rowwise"))
    p.add_argument("--fp8-peer", action="store_true", help="the fp8 part also runs nanochat 92d63d4, bf16 and --fp8")
    p.add_argument("--nanochat-2026-dir", default=os.path.join(".gpu", "nanochat-92d63d4"))
    p.add_argument("--device-type", default="cuda", help="cuda; cpu rehearses every run small (gpu_check.sh)")
    p.add_argument("--cache-dir", default=".gpu", help="gpu_check.sh prepare's shards and tokenizer")
    p.add_argument("--docs", choices=("long", "short"), default="long", help="FineWeb-sized documents (~1,000 "
                   "tokens, long_doc_shards) or tinyshakespeare's paragraphs (~35 tokens, the first GPU run's)")
    p.add_argument("--nanochat-dir", default=os.path.join(".gpu", "nanochat-07c4dd4"))
    p.add_argument("--peer-site", nargs="+", default=[os.path.join(".gpu", "peer_site"), os.path.join(".gpu", "site")],
                   help="directories put on the peer's PYTHONPATH on a GPU machine")
    p.add_argument("--peer-python", default="", help="the peer's python (default: this one on a GPU machine, whose "
                   "image has the peer's packages; the peer's venv, bench.peers.PEER_PYTHON, for a CPU rehearsal)")
    p.add_argument("--timeout", type=float, default=400, help="seconds per run")
    a = p.parse_args(argv)
    a.nanochat_dir, a.nanochat_2026_dir = os.path.abspath(a.nanochat_dir), os.path.abspath(a.nanochat_2026_dir)
    a.peer_python = a.peer_python or (sys.executable if a.device_type == "cuda" else peers.PEER_PYTHON)
    if a.steps < 14:
        p.error(f"--steps {a.steps}: need at least 14 (steps 0-10 are warm-up)")
    if not os.path.exists(os.path.join(a.nanochat_dir, "scripts", "base_train.py")) and "mfu" in a.parts:
        p.error(f"--nanochat-dir {a.nanochat_dir} has no scripts/base_train.py (gpu_check.sh prepare copies it)")
    work = tempfile.mkdtemp(prefix="raychat-gpu-")
    data_dir, tok_dir = prepare_bench_data(a.cache_dir, VOCAB)
    if a.docs == "long":
        data_dir = long_doc_shards(a.cache_dir)
    sides = Sides(a, work, data_dir, tok_dir)
    print(f"settings: {vars(a)}\nwork dir {work}", flush=True)
    table = []

    if "mfu" in a.parts:
        for pattern in a.patterns:
            print(f"\n--- mfu: d{a.depth}, T {a.max_seq_len}, B {a.device_batch_size}, total batch "
                  f"{a.total_batch_size}, {pattern} ---", flush=True)
            flags = shape_flags(a, a.depth, a.total_batch_size, a.steps, pattern)
            n = sides.nanochat(flags, a.total_batch_size, a.nanochat_dir)
            r = sides.raychat(flags, a.total_batch_size)
            table.append((f"d{a.depth} {pattern}: raychat / nanochat", r, n))

    if "fp8" in a.parts:
        print(f"\n--- fp8: raychat --recipe 2026-07, d{a.depth}, total batch {a.fp8_total_batch_size} ---", flush=True)
        flags = ["--recipe", "2026-07", *shape_flags(a, a.depth, a.fp8_total_batch_size, a.steps, "SSSL")]
        bf16 = sides.raychat(flags, a.fp8_total_batch_size, "raychat-2026-07-bf16")
        fp8 = {}
        for recipe in a.fp8_recipes:
            fp8[recipe] = sides.raychat([*flags, "--fp8", "--fp8-recipe", recipe], a.fp8_total_batch_size,
                                        f"raychat-2026-07-fp8-{recipe}")
            table.append((f"d{a.depth} 2026-07: fp8 {recipe} / bf16", fp8[recipe], bf16))
        if a.fp8_peer:  # nanochat 92d63d4 with the same flags (its defaults are the recipe's): bf16, then FP8
            checkout, peer_flags = a.nanochat_2026_dir, flags[2:]
            n_bf16 = sides.nanochat(peer_flags, a.fp8_total_batch_size, checkout, "nanochat-92d63d4-bf16")
            n_fp8 = sides.nanochat([*peer_flags, "--fp8"], a.fp8_total_batch_size, checkout, "nanochat-92d63d4-fp8")
            table += [(f"d{a.depth} 92d63d4: fp8 / bf16", n_fp8, n_bf16),
                      (f"d{a.depth} bf16: raychat / 92d63d4", bf16, n_bf16)]
            if "tensorwise" in fp8:  # the peer's only recipe
                table.append((f"d{a.depth} fp8: raychat / 92d63d4", fp8["tensorwise"], n_fp8))

    if "fit" in a.parts:
        total = 2 * a.device_batch_size * a.max_seq_len
        print(f"\n--- fit: raychat d{a.fit_depth}, B {a.device_batch_size}, T {a.max_seq_len}, two micro-batches ---",
              flush=True)
        fit = sides.raychat(shape_flags(a, a.fit_depth, total, 3, "SSSL"), total, f"raychat-d{a.fit_depth}")
        print(f"  d{a.fit_depth} peak memory {fit['peak_mib']:,.0f} MiB = {100 * fit['peak_mib'] / H100_MIB:.0f}% of "
              f"an 80 GB H100", flush=True)

    if table:
        print(f"\n{'ratio':38s}{'tok/s':>8s}{'mfu':>8s}{'peak mem':>10s}")
        ratio = lambda x, y, k: x[k] / y[k] if y[k] else float("nan")  # noqa: E731  (a CPU has no MFU, no GPU peak)
        for name, x, y in table:
            print(f"{name:38s}{ratio(x, y, 'tok_s'):8.3f}{ratio(x, y, 'mfu'):8.3f}{ratio(x, y, 'peak_mib'):10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
