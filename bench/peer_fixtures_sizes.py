"""The 2026-07 recipe's derived sizes as nanochat 92d63d4 computes them: tests/data/peer_92d63d4_sizes.json.

    /tmp/nanochat-venv/bin/python -m bench.peer_fixtures_sizes [--nanochat-dir ../shared/peers/nanochat-92d63d4]

Runs the peer's own code, not a re-statement of it: the blocks of its scripts/base_train.py that build a model
on the meta device (build_model_meta), size the horizon, the batch (auto, -1), the learning-rate and weight-decay
scales and the number of iterations are cut from the file and executed with its defaults, for depths 4 to 26 (and the
schedules of every step at d4 and d6) at vocab 32768 (nanochat's tokenizer), T 2048, aspect 64, head dim 128, SSSL. tests/test_recipe.py compares raychat's
config.derive with them; it needs neither the peer nor this script. Needs the peer's venv
(bench.peers.PEER_VENV_HINT) and the peer checkout, which is not part of this repository.
"""
import argparse
import json
import math
import os
import sys

from bench import peers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "data", "peer_92d63d4_sizes.json")
DEPTHS = range(4, 27)
SCHEDULE_DEPTHS = (4, 6)
VOCAB = 32768


def cut(source: str, start: str, end: str) -> str:
    """The lines of `source` from the one starting with `start` up to (not including) the one starting with `end`."""
    lines = source.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(start))
    j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith(end))
    return "\n".join(lines[i:j]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanochat-dir", default=peers.default_dir("92d63d4"))
    args_ = parser.parse_args()
    root = os.path.abspath(args_.nanochat_dir)
    script = os.path.join(root, "scripts", "base_train.py")
    if (why := peers.problem(root, os.path.join("scripts", "base_train.py"), commit="92d63d4")) is not None:
        sys.exit(f"error: {why}")
    sys.path.insert(0, root)
    from nanochat.gpt import GPT, GPTConfig  # noqa: F401  (the peer's; the cut code uses them)
    import torch

    source = open(script).read()
    build = cut(source, "def build_model_meta", "# Build the model")
    sizing = cut(source, "def get_scaling_params", "# -----")  # horizon, auto batch, LR and WD scales
    horizon = cut(source, "# num_iterations: either", "total_tokens = ")
    schedules = cut(source, "def get_lr_multiplier", "# -----")  # LR, Muon momentum and weight decay by step
    ns = {"argparse": argparse}
    exec(cut(source, "parser = argparse.ArgumentParser", "args = parser.parse_args()"), ns)  # its defaults
    rows = []
    for depth in DEPTHS:
        args = ns["parser"].parse_args(["--depth", str(depth)])
        scope = {"args": args, "GPT": GPT, "GPTConfig": GPTConfig, "math": math, "torch": torch, "vocab_size": VOCAB,
                 "print0": lambda *a, **k: None}
        exec(build, scope)
        model = scope["model"] = scope["build_model_meta"](depth)
        scope["num_flops_per_token"] = model.estimate_flops()
        exec(sizing, scope)
        exec(horizon, scope)
        rows.append({
            "depth": depth, "param_counts": model.num_scaling_params(), "flops_per_token": model.estimate_flops(),
            "num_scaling_params": scope["num_scaling_params"], "target_tokens": scope["target_tokens"],
            "total_batch_size": scope["total_batch_size"], "batch_lr_scale": scope["batch_lr_scale"],
            "weight_decay_scaled": scope["weight_decay_scaled"], "num_iterations": scope["num_iterations"],
        })
        if depth in SCHEDULE_DEPTHS:  # every step's LR multiplier, Muon momentum and weight decay
            exec(schedules, scope)
            steps = range(scope["num_iterations"] + 1)
            rows[-1]["schedules"] = [[scope[f](it) for f in ("get_lr_multiplier", "get_muon_momentum",
                                                              "get_weight_decay")] for it in steps]
        print(f"d{depth}: B {scope['total_batch_size']:,} | iterations {scope['num_iterations']:,} | "
              f"lr x{scope['batch_lr_scale']:.4f} | wd {scope['weight_decay_scaled']:.6f}")
    with open(OUT, "w") as f:
        json.dump({"peer": "nanochat 92d63d4", "vocab_size": VOCAB, "defaults": vars(ns["parser"].parse_args([])),
                   "rows": rows}, f, separators=(",", ":"))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
