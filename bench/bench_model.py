"""Model-side ratios measured in one run (CPU, fp32, 1 thread unless --threads):

1. attention: the SDPA explicit-mask path (an 'S' layer, window T/2) against the is_causal path ('L' layer);
2. a whole training step (forward + backward) of a small GPT with pattern SSSL against LLLL;
3. sampling: Engine (KV cache) against GPT.generate (a full forward pass per token), tokens/s.

    python -m bench.bench_model [--threads 1] [--dry-run]
"""
import argparse
import time

import torch

from raychat.attention import flash_attn_func
from raychat.engine import Engine
from raychat.model import GPT, GPTConfig


def paired_min(fn_a, fn_b, repeats=5):
    """Min wall time of each of two functions, timed alternately so that load from other processes on a
    shared machine hits both alike (the ratio is what this script reports)."""
    fn_a(), fn_b()  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def small_gpt(pattern, seq_len, n_layer=4, n_embd=256):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=4096, n_layer=n_layer, n_head=4, n_kv_head=4,
                              n_embd=n_embd, window_pattern=pattern))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


class _NoStopTokenizer:
    """The two methods Engine needs, with ids the 4096-token model never emits: lengths stay fixed."""

    def get_bos_token_id(self):
        return 10**6

    def encode_special(self, text):
        return 10**6 + 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seq-len", type=int, default=512, help="T for the attention and step benchmarks")
    parser.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.seq_len < 8:
        parser.error(f"--threads={args.threads} must be >= 1 and --seq-len={args.seq_len} >= 8")
    print(f"threads={args.threads} seq_len={args.seq_len} torch={torch.__version__}")
    if args.dry_run:
        return 0
    torch.set_num_threads(args.threads)
    T = args.seq_len

    q, k, v = (torch.randn(1, T, 4, 64) for _ in range(3))
    t_causal, t_masked = paired_min(lambda: flash_attn_func(q, k, v, window_size=(T, 0)),
                                    lambda: flash_attn_func(q, k, v, window_size=(T // 2, 0)), repeats=20)
    print(f"attention B1 T{T} H4 D64: is_causal {t_causal * 1e3:.2f} ms, masked (window T/2) "
          f"{t_masked * 1e3:.2f} ms, ratio masked/causal = {t_masked / t_causal:.2f}")

    idx = torch.randint(0, 4096, (2, T))
    models = {pattern: small_gpt(pattern, T) for pattern in ("LLLL", "SSSL")}

    def step(pattern):
        models[pattern].zero_grad(set_to_none=True)
        models[pattern](idx, idx).backward()
    t_l, t_s = paired_min(lambda: step("LLLL"), lambda: step("SSSL"), repeats=5)
    step_times = {"LLLL": t_l, "SSSL": t_s}
    print(f"train step d4 n_embd256 B2 T{T}: LLLL {step_times['LLLL'] * 1e3:.1f} ms, SSSL "
          f"{step_times['SSSL'] * 1e3:.1f} ms, ratio SSSL/LLLL = {step_times['SSSL'] / step_times['LLLL']:.2f}")

    model = small_gpt("SSSL", 256).eval()
    prompt, n_new = list(range(1, 129)), 64
    engine = Engine(model, _NoStopTokenizer())
    t_engine, t_naive = paired_min(lambda: engine.generate_batch(prompt, max_tokens=n_new, temperature=0.0),
                                   lambda: list(model.generate(prompt, max_tokens=n_new, temperature=0.0)),
                                   repeats=3)
    print(f"greedy sampling, prompt 128 + {n_new} tokens: Engine {n_new / t_engine:.0f} tok/s, naive "
          f"{n_new / t_naive:.0f} tok/s, speed-up = {t_naive / t_engine:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
