"""A whole training step (forward + backward + MuonAdamW) of small GPTs: fp32 orthogonalisation (raychat's
fallback on CPUs without native bf16 matmuls) against bf16 orthogonalisation (the reference's maths,
docs/REFERENCE.md §5, and the default where bf16 is native), measured in one run.

For each depth and each ortho dtype a fresh spawned process builds the model (seed 0), trains `--steps` steps
on the same batches (tinyshakespeare bytes as tokens when ../shared/data has it, else seeded random tokens)
and reports tokens/s, the forward+backward and optimizer shares of the step, peak RSS, and the loss curve.
The script prints the fp32/bf16 throughput ratio and the difference between the two loss curves.

    python -m bench.bench_core [--depths 4 8] [--steps 20] [--threads 1] [--dry-run]

d4 at the issue's configuration: T = 256, B = 8 rows, vocab 4096, aspect 64 (d = 64·depth), head_dim 64,
window pattern "L". On CUDA it also prints MFU against raychat.common.get_peak_flops.
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import time

import torch

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def batches(steps: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """`steps` (batch, seq_len + 1) token tensors, identical for every configuration."""
    gen = torch.Generator().manual_seed(seed)
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
        starts = torch.randint(0, len(data) - seq_len - 1, (steps, batch), generator=gen)
        return [torch.stack([data[s:s + seq_len + 1] for s in row.tolist()]) for row in starts]
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=gen) for _ in range(steps)]


def run_config(args: dict, queue) -> None:
    """Child process: train one (depth, ortho dtype) configuration and put its figures on `queue`."""
    torch.set_num_threads(args["threads"])
    from raychat.common import get_peak_flops
    from raychat.model import GPT, GPTConfig
    from raychat.optim import MuonAdamW

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    depth = args["depth"]
    torch.manual_seed(0)
    # aspect 64 and head_dim 64: d = 64·depth, so depth heads
    config = GPTConfig(sequence_len=args["seq_len"], vocab_size=args["vocab"], n_layer=depth, n_head=depth,
                       n_kv_head=depth, n_embd=64 * depth, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    # base_train's Muon weight decay at step 0: 0.2 × (12 / depth)² (docs/REFERENCE.md §2)
    opt = MuonAdamW(model.optimizer_groups(weight_decay=0.2 * (12 / depth) ** 2),
                    ortho_dtype=DTYPES[args["ortho"]])
    data = [b.to(device) for b in batches(args["steps"], args["batch"], args["seq_len"], args["vocab"])]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    losses, fwd_bwd, optim = [], 0.0, 0.0
    for step, xy in enumerate(data):
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        losses.append(loss.item())
        if step >= args["warmup"]:  # the first steps pay one-off allocation (and compile on CUDA)
            fwd_bwd += t1 - t0
            optim += t2 - t1
    timed = args["steps"] - args["warmup"]
    tok_per_s = timed * args["batch"] * args["seq_len"] / (fwd_bwd + optim)
    peak = get_peak_flops(torch.cuda.get_device_name() if device == "cuda" else "cpu")
    queue.put({"depth": depth, "ortho": args["ortho"], "device": device, "tok_per_s": tok_per_s,
               "fwd_bwd_s": fwd_bwd / timed, "optim_s": optim / timed, "losses": losses,
               "mfu": model.estimate_flops() * tok_per_s / peak,
               "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_base_mib": rss_base,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6})


def measure(args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_config, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8], help="model depths (d = 64·depth)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left out of the timing")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (B)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (T)")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    args = parser.parse_args(argv)
    if min(args.depths) < 1 or args.threads < 1 or args.batch < 1 or args.seq_len < 8 or args.vocab < 256:
        parser.error(f"need depths >= 1 (got {args.depths}), threads >= 1 ({args.threads}), batch >= 1 "
                     f"({args.batch}), seq-len >= 8 ({args.seq_len}), vocab >= 256 ({args.vocab})")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup={args.warmup} must be in [0, --steps={args.steps})")
    settings = {k: v for k, v in vars(args).items() if k not in ("dry_run", "json")}
    from raychat.optim import default_ortho_dtype

    print(f"settings: {json.dumps(settings)} torch={torch.__version__} "
          f"default_ortho_dtype(cpu)={default_ortho_dtype('cpu')} "
          f"data={'tinyshakespeare bytes' if os.path.exists(SHAKESPEARE) else 'random tokens'}")
    if args.dry_run:
        return 0
    results = []
    for depth in args.depths:
        pair = {}
        for ortho in DTYPES:
            r = measure({**settings, "depth": depth, "ortho": ortho})
            results.append(r)
            pair[ortho] = r
            print(f"d{depth} ortho={ortho}: {r['tok_per_s']:8.0f} tok/s  fwd+bwd {r['fwd_bwd_s']:.3f} s  "
                  f"optim {r['optim_s']:.3f} s ({r['optim_s'] / (r['fwd_bwd_s'] + r['optim_s']):.0%} of the "
                  f"step)  peak RSS {r['rss_mib']:.0f} MiB (after import {r['rss_base_mib']:.0f})  "
                  f"params {r['params_m']:.1f}M  loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"
                  + (f"  MFU {r['mfu']:.1%}" if r["device"] == "cuda" else ""), flush=True)
        a, b = pair["fp32"], pair["bf16"]
        gap = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        print(f"d{depth}: throughput fp32/bf16 = {a['tok_per_s'] / b['tok_per_s']:.2f}x, optimizer time "
              f"fp32/bf16 = {a['optim_s'] / b['optim_s']:.2f}x; loss drop over {args.steps} steps fp32 "
              f"{a['losses'][0] - a['losses'][-1]:.4f} vs bf16 {b['losses'][0] - b['losses'][-1]:.4f}; "
              f"max |loss_fp32 - loss_bf16| over the steps {gap:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
