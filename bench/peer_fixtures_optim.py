"""Three optimizer steps of nanochat 92d63d4's MuonAdamW, saved as the fixture tests/test_optim_2026_07.py checks
raychat's `MuonAdamW(recipe="2026-07")` against, with the peer's own numerical noise beside it.

    python -m bench.peer_fixtures_optim [--nanochat-dir ../shared/peers/nanochat-92d63d4]
        [--peer-python /tmp/nanochat-venv/bin/python] [--out tests/data/peer_92d63d4_optim.pt] [--keep DIR]

This runs the peer, which is not part of this repository: a nanochat 92d63d4 checkout (`--nanochat-dir`; the
default is where this project's workspace keeps it) and a venv for it (bench.peers.PEER_VENV_HINT).

The parameters and groups are the peer's own: a one-layer peer GPT (n_embd 16, one head, vocab 64) and its
`setup_optimizer` at base_train's default learning rates and weight decay (batch = its reference batch, so no
LR or weight-decay scaling), which gives the recipe's betas, per-group weight decay and Muon beta2. Its
parameters are then overwritten with seeded values (its init leaves the projections at zero, which would hide
the cautious weight decay), and three steps are taken with seeded gradients, at lr multiplier 1, Muon momentum
0.85, 0.8503, 0.8506 (base_train's momentum warmup at steps 0-2) and Muon weight decay on base_train's cosine
over a 6-step horizon (so that every step refills the hyperparameters). Inputs are rounded to bf16 and stored so
(exact in fp32, half the bytes); trajectories are fp32 (bf16 where the peer keeps a param in bf16).

Each variant is a fresh peer process, because the peer fixes its compute dtype at import:
  fp32-compiled  the reference: the peer as it runs on this CPU (fp32 compute, its kernels torch.compiled)
  fp32-eager     the same with TORCHDYNAMO_DISABLE=1 (its kernels run eagerly)
  bf16-compiled  NANOCHAT_DTYPE=bfloat16: bf16 Polar Express, and wte / value embeddings stored in bf16
  bf16-eager     both
The fixture keeps the fp32-compiled trajectory, the bf16-compiled params after the last step (all three steps
would take the fixture past 200 KB) and, as the peer's own noise, the relative distance between variants per
step (`rel_distance` below) over all params, the Muon ones and the AdamW ones, printed as a table. It takes
about 2 minutes on 2 cores (two cold compiles). On the CPU this was made on (AMD EPYC, avx512_bf16, torch
2.13): fp32-eager vs fp32-compiled 2.0e-6 / 1.8e-6 / 1.6e-6 of the Muon update at steps 0 / 1 / 2 and
1.6e-8 / 3.9e-8 / 4.8e-8 of the AdamW one; bf16-compiled vs fp32-compiled 4.8e-2 / 4.2e-2 / 4.1e-2 (Muon) and
1.8e-3 / 2.2e-3 / 2.5e-3 (AdamW); bf16-eager vs bf16-compiled 8.1e-2 / 6.5e-2 / 6.4e-2 (Muon).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

from bench import peers

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STEPS = 3
VARIANTS = {  # name: (NANOCHAT_DTYPE, TORCHDYNAMO_DISABLE)
    "fp32-compiled": ("float32", "0"),
    "fp32-eager": ("float32", "1"),
    "bf16-compiled": ("bfloat16", "0"),
    "bf16-eager": ("bfloat16", "1"),
}
# (variant, reference) pairs whose distance is the peer's own noise.
NOISE_PAIRS = (("fp32-eager", "fp32-compiled"), ("bf16-compiled", "fp32-compiled"),
               ("bf16-eager", "bf16-compiled"))


def schedule(step: int) -> dict:
    """The hyperparameters set on the groups before `step`: lr multiplier, Muon momentum and weight decay."""
    return dict(lrm=1.0, momentum=0.85 + 0.12 * step / 400,
                muon_wd_frac=0.5 * (1 + math.cos(math.pi * step / 6)))


def rel_distance(run: dict, ref: dict, init: dict, step: int, names) -> float:
    """||run - ref|| / ||ref - init|| over the params `names` at `step` (fp32): the distance as a fraction of
    the update."""
    num = sum(float((run[n][step].float() - ref[n][step].float()).norm()) ** 2 for n in names)
    den = sum(float((ref[n][step].float() - init[n].float()).norm()) ** 2 for n in names)
    return math.sqrt(num / den)


# ------------------------------------------------------------------------------------------------------
# The child: runs inside the peer's venv, from its root, with the variant's environment.

def child(out_path: str) -> None:
    import torch
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=16,
                          window_pattern="L"))
    model.init_weights()
    # base_train's defaults at its reference batch and horizon (scale factors 1).
    opt = model.setup_optimizer(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28,
                                scalar_lr=0.5)
    names = {p: n for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1234)

    def bf16_exact(shape, std):  # a seeded tensor whose values bf16 holds exactly
        return (torch.randn(shape, generator=gen) * std).bfloat16().float()

    init, grads = {}, [{} for _ in range(STEPS)]
    with torch.no_grad():
        for n, p in model.named_parameters():
            init[n] = bf16_exact(p.shape, 0.25)
            p.copy_(init[n])
    for s in range(STEPS):
        for n, p in model.named_parameters():
            grads[s][n] = bf16_exact(p.shape, 0.1)
    groups = []
    for g in opt.param_groups:
        meta = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
        groups.append(dict(meta, params=[names[p] for p in g["params"]]))
    traj = {n: [] for n in init}
    for s in range(STEPS):
        hp = schedule(s)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * hp["lrm"]
            if g["kind"] == "muon":
                g["momentum"] = hp["momentum"]
                g["weight_decay"] = 0.28 * hp["muon_wd_frac"]
        for n, p in model.named_parameters():
            p.grad = grads[s][n].to(p.dtype)
        opt.step()
        for n, p in model.named_parameters():
            traj[n].append(p.detach().clone())
    from nanochat.common import COMPUTE_DTYPE
    torch.save(dict(init=init, grads=grads, groups=groups, traj=traj,
                    dtypes={n: str(p.dtype) for n, p in model.named_parameters()},
                    compute_dtype=str(COMPUTE_DTYPE), torch=str(torch.__version__)), out_path)


# ------------------------------------------------------------------------------------------------------
# The parent: runs the four variants, checks they share inputs, writes the fixture.

def run_variant(name: str, a, tmp: str) -> dict:
    """One variant in a fresh peer process (a fresh inductor cache: compiled means compiled here)."""
    import torch

    dtype, no_dynamo = VARIANTS[name]
    out = os.path.join(a.keep or tmp, f"{name}.pt")
    env = dict(os.environ, PYTHONPATH=a.nanochat_dir, NANOCHAT_DTYPE=dtype, TORCHDYNAMO_DISABLE=no_dynamo,
               TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"))
    subprocess.run([a.peer_python, os.path.abspath(__file__), "--child", out], cwd=a.nanochat_dir, env=env,
                   check=True)
    return torch.load(out, weights_only=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    peers.add_arguments(p, "92d63d4")
    p.add_argument("--out", default=os.path.join(REPO, "tests", "data", "peer_92d63d4_optim.pt"))
    p.add_argument("--keep", help="keep each variant's full output (<variant>.pt) in this directory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child)
    a.nanochat_dir = os.path.abspath(a.nanochat_dir)
    if (why := peers.problem(a.nanochat_dir, os.path.join("nanochat", "optim.py"), a.peer_python, "92d63d4")):
        sys.exit(f"error: {why}")
    import torch

    with tempfile.TemporaryDirectory(prefix="peer_optim") as tmp:
        if a.keep:
            os.makedirs(a.keep, exist_ok=True)
        runs = {name: run_variant(name, a, tmp) for name in VARIANTS}
    ref = runs["fp32-compiled"]
    for name, r in runs.items():  # every variant starts from the same values, whatever its storage dtypes
        assert all(torch.equal(r["init"][n], ref["init"][n]) for n in ref["init"]), name
    init = ref["init"]
    # Muon's updates are far smaller than the embeddings' AdamW ones, so each kind gets its own figure too.
    kinds = {"all": list(init)}
    for kind in ("muon", "adamw"):
        kinds[kind] = [n for g in ref["groups"] if g["kind"] == kind for n in g["params"]]
    noise = {kind: {f"{run} vs {base}": [rel_distance(runs[run]["traj"], runs[base]["traj"], init, s, names)
                                         for s in range(STEPS)] for run, base in NOISE_PAIRS}
             for kind, names in kinds.items()}
    bf16 = runs["bf16-compiled"]
    fixture = dict(
        peer="nanochat 92d63d4", torch=ref["torch"], steps=STEPS,
        schedule=[schedule(s) for s in range(STEPS)], muon_weight_decay=0.28,
        groups=ref["groups"], bf16_groups=bf16["groups"],
        init={n: t.bfloat16() for n, t in init.items()},
        grads={n: torch.stack([g[n] for g in ref["grads"]]).bfloat16() for n in init},
        traj={n: torch.stack(ts) for n, ts in ref["traj"].items()},
        bf16_dtypes=bf16["dtypes"],
        bf16_final={n: ts[-1] for n, ts in bf16["traj"].items()},
        noise=noise,
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    torch.save(fixture, a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1024:.1f} KiB): {len(init)} params, "
          f"{sum(t.numel() for t in init.values())} values, groups "
          f"{[(g['kind'], len(g['params'])) for g in ref['groups']]}")
    print("bf16 storage:", {n: d for n, d in bf16["dtypes"].items() if d != "torch.float32"})
    print("peer's own noise, ||a - b|| / ||b - init|| over all / Muon / AdamW params, steps 0..2:")
    print(json.dumps({kind: {k: [f"{v:.2e}" for v in vs] for k, vs in d.items()} for kind, d in noise.items()},
                     indent=1))


if __name__ == "__main__":
    main()
