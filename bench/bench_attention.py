"""Sliding-window attention without FA3 on this CPU: forward + backward of one attention layer.

    python -m bench.bench_attention [--threads 2] [--seq-len 2048] [--heads 4] [--windows 2,4] [--repeats 7]
                                    [--blocks 128,192,256,384] [--cpu-time] [--dry-run]

B 2 x 4 heads (`--heads`: a d-depth model with head dim 64 has d heads) x T x head dim 64, fp32, timed for:
- `masked`: the reference's fallback for a sliding window: SDPA over the whole T x T square with a mask;
- `causal`: SDPA's causal kernel, what a full-context (L) layer runs;
- `banded`: raychat's sliding window on CPU, SDPA over the band each block of queries can see
  (raychat.attention.BAND_BLOCK queries per block), once per `--blocks` size when given.
One line per window T // n for each n in `--windows`. Runs are interleaved (masked, causal, banded, masked, ...)
so that load from other processes hits every variant alike; the median and the minimum of `--repeats` runs
are printed, with banded / causal and banded / masked. A window of T/2 covers 3/8 of the square, causal
1/2, so an S layer can cost less than an L layer.

Wall time on a busy machine punishes the banded path more than the others: it runs more, smaller kernels, each
a parallel region that waits for its slowest thread. `--threads 1 --cpu-time` measures the work instead
(process CPU time), which other processes barely disturb: use it to compare variants on a shared machine.
"""
import argparse
import statistics
import time

import torch

from bench.machine import cpu_description
from raychat import attention
from raychat.attention import flash_attn_func


def fwd_bwd(q, k, v, grad, clock, window, impl, block=None):
    """One forward + backward of flash_attn_func with `impl` forced ('masked' or 'sdpa'); returns seconds."""
    attention.set_attention_impl(impl)
    if block is not None:
        attention.BAND_BLOCK = block
    for t in (q, k, v):
        t.grad = None
    t0 = clock()
    flash_attn_func(q, k, v, window_size=(window, 0)).backward(grad)
    return clock() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--seq-len", type=int, default=2048, help="T (default 2048)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4; d6's layer has 6)")
    parser.add_argument("--windows", default="2,4", help="windows T // n for these n (default 2,4: T/2 and T/4)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each variant (default 7)")
    parser.add_argument("--blocks", default="", help="banded query-block sizes to compare (default: BAND_BLOCK)")
    parser.add_argument("--cpu-time", action="store_true", help="time process CPU time, not wall time")
    parser.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    args = parser.parse_args(argv)
    try:
        divisors = [int(n) for n in args.windows.split(",")]
        blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else [attention.BAND_BLOCK]
    except ValueError:
        parser.error(f"--windows={args.windows!r} and --blocks={args.blocks!r} must be comma-separated integers")
    if min(args.threads, args.heads, args.repeats, *divisors, *blocks) < 1 or args.seq_len < 8:
        parser.error("--threads, --heads, --repeats, --windows and --blocks must be >= 1 and --seq-len >= 8")
    torch.set_num_threads(args.threads)
    B, H, T, D = 2, args.heads, args.seq_len, 64
    print(f"CPU: {cpu_description()}")
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), threads={torch.get_num_threads()}, "
          f"B{B} x H{H} x T{T} x D{D} fp32, forward + backward, {args.repeats} interleaved repeats of "
          f"{'process CPU' if args.cpu_time else 'wall'} time, "
          f"attention path on cpu: {attention.attention_path([(T // 2, 0), (T, 0)], T, 'cpu')}")
    if args.dry_run:
        return 0

    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(B, T, H, D, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    clock = time.process_time if args.cpu_time else time.perf_counter
    default_block = attention.BAND_BLOCK
    try:
        for n in divisors:
            window = T // n
            variants = {"masked": (window, "masked", None), "causal": (-1, "sdpa", None)}
            variants.update({f"banded{b}" if len(blocks) > 1 else "banded": (window, "sdpa", b) for b in blocks})
            for spec in variants.values():  # warm-up
                fwd_bwd(q, k, v, grad, clock, *spec)
            times = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, spec in variants.items():
                    times[name].append(fwd_bwd(q, k, v, grad, clock, *spec))
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            print(f"window T/{n} = {window}: " + ", ".join(
                f"{name} {med[name]:.1f} ms (min {min(times[name]) * 1e3:.1f})" for name in variants))
            for name in variants:
                if name.startswith("banded"):
                    print(f"  {name}: {med[name] / med['causal']:.2f} x causal, "
                          f"{med[name] / med['masked']:.2f} x masked (medians)")
    finally:
        attention.set_attention_impl(None)
        attention.BAND_BLOCK = default_block
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
