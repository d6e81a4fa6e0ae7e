"""MuonAdamW / DistMuonAdamW with recipe="2026-07" against three steps of nanochat 92d63d4's own optimizer.

The fixture (tests/data/peer_92d63d4_optim.pt, written by bench/peer_fixtures_optim.py) holds the peer's
parameter groups and settings for a one-layer GPT (tall, wide and square Muon matrices; its six AdamW groups,
whose wte and value embeddings it stores in bf16 when it computes in bf16), the initial values, three steps'
gradients, the params after each step as the peer computes them on this CPU (fp32 compute, its kernels
compiled) and after the last step in bf16 compute, and the peer's own noise: how far its trajectory moves when
the same steps run with its kernels eager, or in bf16. A distance is ||ours - peer|| / ||peer - init|| over a
set of params at a step, i.e. a fraction of the update so far, taken for the Muon and the AdamW params apart
(the embeddings' AdamW steps are far larger than Muon's and would hide it).

On the CPU that made the fixture, the eager kernels here reproduce the peer's eager kernels bit for bit (fp32
and bf16), so their distance to its compiled trajectory is exactly the peer's own eager-vs-compiled distance;
compiled (not run here: a cold compile costs ~50 s) they reproduce its compiled steps bit for bit. Other CPUs
round matmuls differently, hence the margins.
"""
import os

import pytest
import torch

from raychat.optim import DistMuonAdamW, MuonAdamW, gather_full_state, shard_state
from tests._gloo import run_gloo

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "peer_92d63d4_optim.pt")
WORLD = 2
BF16_STORED = ("transformer.wte.weight", "value_embeds.0.weight")


def load_fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def fx():
    return load_fixture()


def build(fx: dict, bf16: bool = False):
    """(params by name, param groups) as the peer built them; `bf16`: the peer's bf16-compute storage dtypes."""
    params = {}
    for name, t in fx["init"].items():
        dtype = getattr(torch, fx["bf16_dtypes"][name].removeprefix("torch.")) if bf16 else torch.float32
        params[name] = torch.nn.Parameter(t.to(dtype, copy=True))  # the fixture's init stays untouched
    groups = [dict(g, params=[params[n] for n in g["params"]]) for g in fx["groups"]]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return params, groups


def run_steps(fx: dict, opt, params: dict) -> dict:
    """The fixture's three steps (its schedule and gradients): {name: (steps, *shape)} of params after each."""
    initial_lr = [g["lr"] for g in opt.param_groups]
    traj = {n: [] for n in params}
    for s, hp in enumerate(fx["schedule"]):
        for g, lr in zip(opt.param_groups, initial_lr):
            g["lr"] = lr * hp["lrm"]
            if g["kind"] == "muon":
                g["momentum"] = hp["momentum"]
                g["weight_decay"] = fx["muon_weight_decay"] * hp["muon_wd_frac"]
        for n, p in params.items():
            p.grad = fx["grads"][n][s].to(p.dtype)
        opt.step()
        for n, p in params.items():
            traj[n].append(p.detach().clone())
    return {n: torch.stack(ts) for n, ts in traj.items()}


def names_of(fx: dict, kind: str) -> list[str]:
    return [n for g in fx["groups"] if g["kind"] == kind for n in g["params"]]


def distance(run: dict, ref: dict, init: dict, step: int, names) -> float:
    """||run - ref|| / ||ref - init|| over the params `names` at `step`, in fp32."""
    num = sum((run[n][step].float() - ref[n][step].float()).norm() ** 2 for n in names)
    den = sum((ref[n][step].float() - init[n].float()).norm() ** 2 for n in names)
    return float((num / den).sqrt())


def assert_within_fp32_noise(fx: dict, traj: dict) -> None:
    """Per kind and step: within 10x the peer's own fp32 noise (its eager kernels against its compiled ones:
    1.6e-6..2.0e-6 for Muon, 1.6e-8..4.8e-8 for AdamW), at least 1e-6 (a few fp32 roundings of the update);
    both far below its bf16-vs-fp32 distance (4e-2 Muon, 2e-3 AdamW)."""
    for kind in ("muon", "adamw"):
        for s in range(fx["steps"]):
            noise = fx["noise"][kind]["fp32-eager vs fp32-compiled"][s]
            got = distance(traj, fx["traj"], fx["init"], s, names_of(fx, kind))
            assert got <= max(10 * noise, 1e-6), f"{kind} step {s}: {got:.3g} from the peer, its own noise {noise:.3g}"


# ------------------------------------------------------------------------------------------------------

def test_fixture_is_the_peers_2026_07_setup(fx):
    """What the comparison rests on: the peer's groups (its 2026-07 betas, weight decays, Muon beta2 0.9) over
    tall, wide and square Muon matrices, and a noise record in which bf16 dwarfs fp32."""
    kinds = [g["kind"] for g in fx["groups"]]
    assert kinds.count("adamw") == 6 and kinds.count("muon") == 4
    muon_shapes = {tuple(fx["init"][n].shape) for n in names_of(fx, "muon")}
    assert {(64, 16), (16, 64), (16, 16)} <= muon_shapes
    assert all(g["beta2"] == 0.9 for g in fx["groups"] if g["kind"] == "muon")
    assert {tuple(g["betas"]) for g in fx["groups"] if g["kind"] == "adamw"} >= {(0.8, 0.96), (0.8, 0.995)}
    assert all(fx["bf16_dtypes"][n] == "torch.bfloat16" for n in BF16_STORED)
    for kind in ("muon", "adamw"):
        noise = fx["noise"][kind]
        assert 100 * max(noise["fp32-eager vs fp32-compiled"]) < min(noise["bf16-compiled vs fp32-compiled"])


def test_fp32_steps_match_the_peer(fx):
    params, groups = build(fx)
    opt = MuonAdamW(groups, ortho_dtype=torch.float32, compile_kernels=False, recipe="2026-07")
    assert_within_fp32_noise(fx, run_steps(fx, opt, params))


def test_seed_recipe_is_measurably_different(fx):
    """The same steps with the seed's arithmetic: the Muon matrices land thousands of times the tolerance away
    (no MuonEq, no Muon+, slack 1.02); for fp32 params the two AdamW updates differ by a rounding only."""
    params, groups = build(fx)
    traj = run_steps(fx, MuonAdamW(groups, ortho_dtype=torch.float32, compile_kernels=False), params)
    for s in range(fx["steps"]):
        assert distance(traj, fx["traj"], fx["init"], s, names_of(fx, "muon")) > 0.05
        assert distance(traj, fx["traj"], fx["init"], s, names_of(fx, "adamw")) < 1e-6


def test_bf16_compute_matches_the_peers_bf16(fx):
    """The peer in bf16 compute: bf16 Polar Express, the result cast back to fp32 before variance reduction, and
    wte / value embeddings stored in bf16 with their AdamW arithmetic in fp32. Eager bf16 here against the
    peer's compiled bf16 (after the last step, all the fixture keeps) is within the peer's own distance between
    its eager and compiled bf16 (6.4e-2 of the Muon update: bf16 roundings that inductor does not make); the
    bf16-stored params agree to one bf16 rounding, where the seed's bf16 AdamW arithmetic is far off."""
    last = fx["steps"] - 1
    peer = {n: t.expand(fx["steps"], *t.shape) for n, t in fx["bf16_final"].items()}
    params, groups = build(fx, bf16=True)
    traj = run_steps(fx, MuonAdamW(groups, ortho_dtype=torch.bfloat16, compile_kernels=False, recipe="2026-07"),
                     params)
    for kind in ("muon", "adamw"):
        noise = fx["noise"][kind]["bf16-eager vs bf16-compiled"][last]
        got = distance(traj, peer, fx["init"], last, names_of(fx, kind))
        assert got <= max(1.5 * noise, 1e-6), (kind, got, noise)
    for name in BF16_STORED:
        assert traj[name].dtype == torch.bfloat16
        torch.testing.assert_close(traj[name][last], fx["bf16_final"][name], rtol=2 ** -7, atol=1e-6)
    params, groups = build(fx, bf16=True)
    seed = run_steps(fx, MuonAdamW(groups, ortho_dtype=torch.bfloat16, compile_kernels=False), params)
    assert distance(seed, peer, fx["init"], last, BF16_STORED) > 1e-3


def test_default_ortho_dtype_follows_the_peers_compute_dtype(monkeypatch):
    """Without an ortho_dtype the 2026-07 recipe orthogonalises as the peer computes by default: bf16 on CUDA
    (compiled), fp32 on any CPU, even one with native bf16 where the seed picks bf16."""
    from raychat import optim

    monkeypatch.setattr(optim, "_cpu_flags", lambda: {"avx512_bf16"})
    optim.cpu_has_native_bf16.cache_clear()
    assert optim.default_ortho_dtype("cpu", compiled=True) == torch.bfloat16
    assert optim.default_ortho_dtype("cpu", compiled=True, recipe="2026-07") == torch.float32
    assert optim.default_ortho_dtype("cuda", compiled=True, recipe="2026-07") == torch.bfloat16
    assert optim.default_ortho_dtype("cuda", compiled=False, recipe="2026-07") == torch.float32
    p = torch.nn.Parameter(torch.randn(4, 4))
    group = dict(kind="muon", params=[p], lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    assert MuonAdamW([group], compile_kernels=True, recipe="2026-07").ortho_dtype_for(p.device) == torch.float32
    monkeypatch.undo()
    optim.cpu_has_native_bf16.cache_clear()
    with pytest.raises(ValueError, match="recipe='2025' is unknown"):
        MuonAdamW([group], recipe="2025")


@pytest.mark.parametrize("recipe", ["seed", "2026-07"])
def test_bf16_polar_express_then_fp32_update(recipe):
    """2026-07 casts the bf16 Polar Express result back to the (fp32) param dtype before the update, so the lr
    stays fp32: an lr 2^-10 larger moves the params 2^-10 further (the update is linear in lr without weight
    decay). The seed keeps the lr in bf16, which cannot tell the two lrs apart."""
    updates = []
    for lr in (0.02, 0.02 * (1 + 2 ** -10)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(32, 8)) for _ in range(2)]
        opt = MuonAdamW([dict(kind="muon", params=params, lr=lr, momentum=0.9, ns_steps=5, beta2=0.9,
                              weight_decay=0.0)], ortho_dtype=torch.bfloat16, compile_kernels=False, recipe=recipe)
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()
        updates.append(sum((p.detach() - b).norm() for p, b in zip(params, before)))
    ratio = float(updates[1] / updates[0])
    if recipe == "2026-07":
        assert abs(ratio - (1 + 2 ** -10)) < 1e-4, ratio
    else:
        assert ratio == 1.0, ratio


# ------------------------------------------------------------------------------------------------------
# ZeRO-2 over 2 gloo processes: every rank gets the fixture's gradients, so their average is exactly them.
# The (64, 16) AdamW params are reduce-scattered by rows; rank 1 owns no matrix of the three 1-matrix Muon groups.

def _dist_worker(rank, world_size, out_dir):
    fx = load_fixture()
    out = {}
    for bf16 in (False, True):
        params, groups = build(fx, bf16=bf16)
        opt = DistMuonAdamW(groups, ortho_dtype=torch.bfloat16 if bf16 else torch.float32, compile_kernels=False,
                            recipe="2026-07")
        out[bf16] = {"traj": run_steps(fx, opt, params), "shard": opt.state_dict()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for i, entry in b["state"].items():
        assert a["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(a["state"][i][key], value, rtol=1e-6, atol=1e-7)
            else:
                assert a["state"][i][key] == value


@pytest.mark.slow  # two spawned processes: ~10 s on 2 cores
def test_dist_matches_single_process_and_the_peer(fx, tmp_path):
    run_gloo(_dist_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for bf16 in (False, True):
        params, groups = build(fx, bf16=bf16)
        single = MuonAdamW(groups, ortho_dtype=torch.bfloat16 if bf16 else torch.float32, compile_kernels=False,
                           recipe="2026-07")
        single_traj = run_steps(fx, single, params)
        for r in ranks:
            for n in single_traj:
                torch.testing.assert_close(r[bf16]["traj"][n], single_traj[n], rtol=1e-6, atol=1e-7)
            if not bf16:
                assert_within_fp32_noise(fx, r[bf16]["traj"])
        # The shards make up the single-process state and are cut back from it (what resharding relies on).
        shards = [r[bf16]["shard"] for r in ranks]
        full = gather_full_state(shards, single.param_shapes())
        _assert_same_state(full, single.state_dict())
        for rank, shard in enumerate(shards):
            _assert_same_state(shard_state(full, single.param_shapes(), rank, WORLD), shard)
