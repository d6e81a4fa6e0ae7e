"""MuonAdamW / DistMuonAdamW against naive re-derivations of the maths (docs/REFERENCE.md §5) and against torch.optim.AdamW.

All CPU, fp32 params. The distributed tests spawn 2 real gloo processes (no Ray).
"""
import io
import math
import os

import pytest
import torch

from raychat.optim import POLAR_EXPRESS_COEFFS, DistMuonAdamW, MuonAdamW, default_ortho_dtype, polar_express
from tests._gloo import run_gloo

BETAS = (0.8, 0.95)


# ------------------------------------------------------------------------------------------------------
# Naive reference maths, written out matrix by matrix.

def ref_adamw(p, g, st, lr, beta1, beta2, eps, wd):
    """Returns the new p; st = {'step', 'm', 'v'} is updated."""
    st["step"] += 1
    p = p * (1 - lr * wd)
    st["m"] = st["m"] + (1 - beta1) * (g - st["m"])
    st["v"] = st["v"] + (1 - beta2) * (g * g - st["v"])
    bias1, bias2 = 1 - beta1 ** st["step"], 1 - beta2 ** st["step"]
    return p - (lr / bias1) * st["m"] / (torch.sqrt(st["v"] / bias2) + eps)


def ref_muon(ps, gs, st, lr, momentum, beta2, wd, cautious=True):
    """ps, gs: lists of (rows, cols) matrices. st = {'buf': [..], 'buf2': [..]}. Returns the new ps."""
    rows, cols = ps[0].shape
    eff_lr = lr * math.sqrt(max(1.0, rows / cols))
    new_ps = []
    for i, (p, g) in enumerate(zip(ps, gs)):
        st["buf"][i] = st["buf"][i] + (1 - momentum) * (g - st["buf"][i])
        u = (1 - momentum) * g + momentum * st["buf"][i]
        x = u / (torch.linalg.matrix_norm(u) * 1.02 + 1e-6)
        for a, b, c in POLAR_EXPRESS_COEFFS:
            if rows > cols:
                A = x.T @ x
                x = a * x + x @ (b * A + c * A @ A)
            else:
                A = x @ x.T
                x = a * x + (b * A + c * A @ A) @ x
        if rows >= cols:  # one statistic per row
            v_mean = (x * x).mean(dim=1, keepdim=True)
            n = cols
        else:  # one per column
            v_mean = (x * x).mean(dim=0, keepdim=True)
            n = rows
        fro = torch.sqrt((v_mean * n).sum())
        st["buf2"][i] = st["buf2"][i] + (1 - beta2) * (v_mean - st["buf2"][i])
        step_size = 1 / torch.sqrt(torch.clamp(st["buf2"][i], min=1e-10))
        fro_new = torch.sqrt((v_mean * n * step_size ** 2).sum())
        upd = x * step_size * fro / max(fro_new, 1e-10)
        mask = ((upd * p) >= 0).float() if cautious else torch.ones_like(p)
        new_ps.append(p - eff_lr * upd - eff_lr * wd * p * mask)
    return new_ps


def through_disk(state_dict):
    """Serialise and reload, as a checkpoint would. (Loading the live dict would alias the first optimizer's
    state tensors: Optimizer.load_state_dict keeps tensors that already have the right dtype and device.)"""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def muon_group(params, lr=0.05, momentum=0.9, wd=0.5):
    return dict(kind="muon", params=params, lr=lr, momentum=momentum, ns_steps=5, beta2=0.95, weight_decay=wd)


def adamw_group(params, lr=0.01, betas=BETAS, wd=0.0):
    return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd)


# ------------------------------------------------------------------------------------------------------
# Single process

@pytest.mark.parametrize("shape", [(96, 24), (24, 96), (48, 48)], ids=["tall", "wide", "square"])
def test_polar_express_orthogonalises(shape):
    torch.manual_seed(0)
    rows, cols = shape
    r = min(shape)
    U, _ = torch.linalg.qr(torch.randn(rows, rows))
    V, _ = torch.linalg.qr(torch.randn(cols, cols))
    spectrum = torch.logspace(0, -2, r)  # condition number 100
    mats = torch.stack([torch.randn(shape), U[:, :r] @ torch.diag(spectrum) @ V[:r]])
    x = polar_express(mats, 5, torch.float32)
    sv = torch.linalg.svdvals(x)
    # Polar Express band: every singular value pushed into ~[0.86, 1.14] (measured), from 1e-2..1.
    assert sv.min() > 0.8 and sv.max() < 1.2, sv
    # ... while keeping the singular vectors: close to the exact polar factor U Vᵀ of the second matrix.
    polar = U[:, :r] @ V[:r]
    assert torch.linalg.matrix_norm(x[1] - polar) / torch.linalg.matrix_norm(polar) < 0.15


def test_adamw_matches_torch_adamw():
    """The AdamW update is standard AdamW: 10 steps equal torch.optim.AdamW (as the reference's own test)."""
    torch.manual_seed(1)
    init = [torch.randn(64, 32), torch.randn(7), torch.randn(3, 5, 4)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = MuonAdamW([dict(kind="adamw", params=ours, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)])
    ref = torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(10):
        grads = [torch.randn_like(t) for t in init]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q, t in zip(ours, theirs, init):
        assert not torch.equal(p, t)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _mixed_setup(seed=2):
    """AdamW (one with wd) + a tall and a wide Muon group, with wd on so the cautious mask matters."""
    torch.manual_seed(seed)
    adam = [torch.nn.Parameter(torch.randn(40, 8)), torch.nn.Parameter(torch.randn(5))]
    tall = [torch.nn.Parameter(torch.randn(48, 16) * 0.1) for _ in range(3)]
    wide = [torch.nn.Parameter(torch.randn(16, 40) * 0.1) for _ in range(2)]
    groups = [adamw_group(adam[:1], wd=0.0), adamw_group(adam[1:], lr=0.05, wd=0.3),
              muon_group(tall), muon_group(wide, lr=0.03, momentum=0.85)]
    return adam, tall, wide, groups


def test_steps_match_naive_formulas():
    adam, tall, wide, groups = _mixed_setup()
    opt = MuonAdamW(groups, ortho_dtype=torch.float32)
    ref_p = {"adam": [p.detach().clone() for p in adam], "tall": [p.detach().clone() for p in tall],
             "wide": [p.detach().clone() for p in wide]}
    ref_adam_st = [{"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in adam]

    def muon_state(ps):
        rows, cols = ps[0].shape
        shape2 = (rows, 1) if rows >= cols else (1, cols)
        return {"buf": [torch.zeros_like(p) for p in ps], "buf2": [torch.zeros(shape2) for _ in ps]}

    ref_st = {"tall": muon_state(tall), "wide": muon_state(wide)}
    no_caution = {k: [p.clone() for p in v] for k, v in ref_p.items() if k != "adam"}
    no_caution_st = {"tall": muon_state(tall), "wide": muon_state(wide)}
    for step in range(4):
        # The schedule changes lr/momentum/wd every step; the optimizer must pick them up.
        groups_now = opt.param_groups
        groups_now[2]["weight_decay"] = 0.5 - 0.1 * step
        groups_now[2]["momentum"] = 0.85 + 0.02 * step
        for p in adam + tall + wide:
            p.grad = torch.randn_like(p)
        for i, p in enumerate(adam):
            g = groups_now[i]
            ref_p["adam"][i] = ref_adamw(ref_p["adam"][i], p.grad, ref_adam_st[i], g["lr"], *g["betas"], g["eps"],
                                         g["weight_decay"])
        for name, ps, g in (("tall", tall, groups_now[2]), ("wide", wide, groups_now[3])):
            grads = [p.grad for p in ps]
            args = (g["lr"], g["momentum"], g["beta2"], g["weight_decay"])
            ref_p[name] = ref_muon(ref_p[name], grads, ref_st[name], *args)
            no_caution[name] = ref_muon(no_caution[name], grads, no_caution_st[name], *args, cautious=False)
        opt.step()
        for name, ps in (("adam", adam), ("tall", tall), ("wide", wide)):
            for p, r in zip(ps, ref_p[name]):
                torch.testing.assert_close(p.detach(), r, rtol=1e-4, atol=2e-6)
    # The cautious mask mattered: decaying everywhere gives measurably different params.
    for name, ps in (("tall", tall), ("wide", wide)):
        diff = max((p.detach() - r).abs().max().item() for p, r in zip(ps, no_caution[name]))
        assert diff > 1e-3, name
    # State layout: on the group's first param only, stacked.
    assert set(opt.state[tall[0]]) == {"momentum_buffer", "second_momentum_buffer"}
    assert opt.state[tall[0]]["momentum_buffer"].shape == (3, 48, 16)
    assert opt.state[tall[0]]["second_momentum_buffer"].shape == (3, 48, 1)
    assert opt.state[wide[0]]["second_momentum_buffer"].shape == (2, 1, 40)
    assert tall[1] not in opt.state
    torch.testing.assert_close(opt.state[wide[0]]["momentum_buffer"][1], ref_st["wide"]["buf"][1])


def test_bf16_ortho_agrees_with_fp32():
    """Forcing the reference's bf16 Polar Express (and bf16 beta2/lr/wd) changes updates by bf16 rounding only."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        adam, tall, wide, groups = _mixed_setup(seed=3)
        before = [p.detach().clone() for p in tall + wide]
        opt = MuonAdamW(groups, ortho_dtype=dtype)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            for p in adam + tall + wide:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results[dtype] = [p.detach() - b for p, b in zip(tall + wide, before)]
    for u32, u16 in zip(results[torch.float32], results[torch.bfloat16]):
        rel = torch.linalg.matrix_norm(u32 - u16) / torch.linalg.matrix_norm(u32)
        # bf16 Polar Express itself differs from fp32 by 3-6% (Frobenius, measured on random 48x16 .. 1024x256
        # stacks: 5 iterations amplify the ~0.4% rounding of each bf16 matmul); the updates must agree that well
        # and no better (a difference < 1e-3 would mean bf16 was never used).
        assert 1e-3 < rel < 0.08, rel
        cosine = (u32 * u16).sum() / (torch.linalg.matrix_norm(u32) * torch.linalg.matrix_norm(u16))
        assert cosine > 0.995, cosine


def test_default_ortho_dtype_is_bf16_where_compiled_and_bf16_is_native(monkeypatch):
    from raychat import optim

    assert default_ortho_dtype("cuda") == torch.bfloat16  # the reference's bf16 Polar Express (compiled on CUDA)
    assert default_ortho_dtype("cuda", compiled=False) == torch.float32
    assert default_ortho_dtype("mps") == torch.float32
    for flags, expected in (({"avx512f", "avx512bw", "avx2"}, torch.float32),  # bf16 emulated: fp32
                            ({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16", "amx_tile"}, torch.bfloat16),
                            ({"fp", "asimd", "bf16"}, torch.bfloat16), (set(), torch.float32)):
        monkeypatch.setattr(optim, "_cpu_flags", lambda flags=flags: flags)
        optim.cpu_has_native_bf16.cache_clear()
        assert default_ortho_dtype("cpu", compiled=True) == expected, flags
        assert default_ortho_dtype("cpu", compiled=False) == torch.float32  # eager bf16 is not the reference's
    monkeypatch.undo()
    optim.cpu_has_native_bf16.cache_clear()


def test_state_dict_round_trip_single_process():
    adam, tall, wide, groups = _mixed_setup()
    for g in groups:
        g["initial_lr"] = g["lr"]
    opt = MuonAdamW(groups)
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) for p in adam + tall + wide] for _ in range(4)]

    def run(o, params, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            o.step()

    run(opt, adam + tall + wide, grads[:2])
    saved = opt.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in adam + tall + wide]
    a2, t2, w2 = copies[:2], copies[2:5], copies[5:]
    opt2 = MuonAdamW([adamw_group(a2[:1]), adamw_group(a2[1:], lr=0.05, wd=0.3), muon_group(t2),
                      muon_group(w2, lr=0.03, momentum=0.85)])
    opt2.load_state_dict(through_disk(saved))
    assert opt2.param_groups[0]["initial_lr"] == 0.01 and opt2.state[a2[0]]["step"] == 2
    run(opt, adam + tall + wide, grads[2:])
    run(opt2, copies, grads[2:])
    for p, q in zip(adam + tall + wide, copies):
        assert torch.equal(p, q)


def test_bad_inputs_raise_clear_errors():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="kind='sgd' is unknown"):
        MuonAdamW([dict(kind="sgd", params=[p], lr=0.1)])
    with pytest.raises(ValueError, match=r"shapes \[\(4, 4\), \(4, 5\)\]"):
        MuonAdamW([muon_group([p, torch.nn.Parameter(torch.randn(4, 5))])])
    with pytest.raises(ValueError, match="missing"):
        MuonAdamW([dict(kind="adamw", params=[p], lr=0.1)])
    with pytest.raises(ValueError, match="ortho_dtype"):
        MuonAdamW([muon_group([p])], ortho_dtype=torch.float16)
    with pytest.raises(RuntimeError, match="initialised default process group"):
        DistMuonAdamW([muon_group([p])])
    # A state dict from another layout (same group sizes, other shapes) is refused, naming both shapes.
    two = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    opt = MuonAdamW([muon_group(two)])
    for q in two:
        q.grad = torch.randn(4, 4)
    opt.step()
    other = MuonAdamW([muon_group([torch.nn.Parameter(torch.randn(4, 5)) for _ in range(2)])])
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4\), expected \(2, 4, 5\)"):
        other.load_state_dict(through_disk(opt.state_dict()))


# ------------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes against the single-process optimizer fed the averaged gradients.

WORLD = 2


def _dist_params(seed=7):
    """Small AdamW (numel < 1024), large AdamW (shape[0] even), Muon groups with K = 3, 5, 1 (W = 2 leaves
    rank 1 with fewer params, or none)."""
    torch.manual_seed(seed)
    shapes = {"small": [(6,), (8, 8)], "large": [(64, 32)], "k3": [(32, 16)] * 3, "k5": [(16, 24)] * 5,
              "k1": [(24, 24)]}
    return {k: [torch.nn.Parameter(torch.randn(s) * 0.2) for s in v] for k, v in shapes.items()}


def _dist_groups(ps):
    return [adamw_group(ps["small"], lr=0.02), adamw_group(ps["large"], wd=0.1),
            muon_group(ps["k3"]), muon_group(ps["k5"], lr=0.03), muon_group(ps["k1"], wd=0.2)]


def _flat(ps):
    return [p for k in ("small", "large", "k3", "k5", "k1") for p in ps[k]]


def _rank_grads(params, step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _dist_worker(rank, world_size, out_dir, steps, split):
    ps = _dist_params()
    params = _flat(ps)
    opt = DistMuonAdamW(_dist_groups(ps))

    def run(o, prm, step_range):
        for s in step_range:
            for p, g in zip(prm, _rank_grads(prm, s, rank)):
                p.grad = g
            o.step()

    run(opt, params, range(split))
    shard = opt.state_dict()
    # A fresh optimizer on a copy of the params, loaded from this rank's shard, must continue identically.
    ps2 = {k: [torch.nn.Parameter(p.detach().clone()) for p in v] for k, v in ps.items()}
    opt2 = DistMuonAdamW(_dist_groups(ps2))
    opt2.load_state_dict(through_disk(shard))
    run(opt, params, range(split, steps))
    run(opt2, _flat(ps2), range(split, steps))
    wrong_world = None
    # 33 rows over 2 ranks (an elastic run's odd split): rank 0 owns rows 0-16, rank 1 rows 17-32, zero-padded
    # in the collectives. The same gradient on both ranks, so the average is that gradient exactly.
    odd = torch.nn.Parameter(torch.randn(33, 32, generator=torch.Generator().manual_seed(5)))
    odd_opt = DistMuonAdamW([adamw_group([odd], wd=0.1)])
    for s in range(2):
        odd.grad = torch.randn(33, 32, generator=torch.Generator().manual_seed(50 + s))
        odd_opt.step()
    bad = {"param": odd.detach().clone(), "rows": odd_opt.state[odd]["exp_avg"].shape[0]}
    try:  # a W=2 shard into a single-process optimizer: the shapes name the mismatch
        MuonAdamW(_dist_groups(_dist_params())).load_state_dict(through_disk(shard))
    except ValueError as e:
        wrong_world = str(e)
    torch.save({"params": [p.detach() for p in params], "reloaded": [p.detach() for p in _flat(ps2)],
                "shard": shard, "bad": bad,
                "wrong_world": wrong_world}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    steps, split = 4, 2
    run_gloo(_dist_worker, WORLD, str(out), steps, split)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    # Single-process reference fed the averaged gradients.
    ps = _dist_params()
    params = _flat(ps)
    opt = MuonAdamW(_dist_groups(ps))
    for s in range(steps):
        per_rank = [_rank_grads(params, s, r) for r in range(WORLD)]
        for i, p in enumerate(params):
            p.grad = sum(g[i] for g in per_rank) / WORLD
        opt.step()
    return ranks, [p.detach() for p in params], _flat(_dist_params())


def test_dist_matches_single_process_on_averaged_grads(dist_results):
    ranks, single, init = dist_results
    for r in ranks:
        for p, q, p0 in zip(r["params"], single, init):
            assert not torch.equal(p, p0)
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # Every rank ends with the full, identical params (gathers completed).
    for p, q in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p, q)


def test_dist_state_is_sharded_and_reloads(dist_results):
    ranks, _, _ = dist_results
    for rank, r in enumerate(ranks):
        state = r["shard"]["state"]
        # positions: 0-1 small, 2 large, 3-5 k3, 6-10 k5, 11 k1
        assert state[0]["exp_avg"].shape == (6,) and state[1]["exp_avg"].shape == (8, 8)
        assert state[2]["exp_avg"].shape == (32, 32)  # dim-0 slice of (64, 32)
        assert state[3]["momentum_buffer"].shape == (2, 32, 16)  # chunk = ceil(3 / 2)
        assert state[6]["momentum_buffer"].shape == (3, 16, 24)
        assert state[6]["second_momentum_buffer"].shape == (3, 1, 24)
        assert state[11]["momentum_buffer"].shape == (1, 24, 24)
        assert 4 not in state and 7 not in state
        for p, q in zip(r["params"], r["reloaded"]):
            assert torch.equal(p, q)
    # Rank 1 owns nothing of the K=1 group and only param 2 of K=3: its unused buffers stay zero.
    assert ranks[1]["shard"]["state"][11]["momentum_buffer"].abs().sum() == 0
    assert ranks[0]["shard"]["state"][11]["momentum_buffer"].abs().sum() > 0
    assert ranks[1]["shard"]["state"][3]["momentum_buffer"][1].abs().sum() == 0
    assert ranks[1]["shard"]["state"][3]["momentum_buffer"][0].abs().sum() > 0
    # The two ranks hold different slices of the large AdamW state.
    assert not torch.equal(ranks[0]["shard"]["state"][2]["exp_avg"], ranks[1]["shard"]["state"][2]["exp_avg"])


def test_dist_shards_uneven_adamw_rows(dist_results):
    ranks, _, _ = dist_results
    odd = torch.nn.Parameter(torch.randn(33, 32, generator=torch.Generator().manual_seed(5)))
    single = MuonAdamW([adamw_group([odd], wd=0.1)])
    for s in range(2):
        odd.grad = torch.randn(33, 32, generator=torch.Generator().manual_seed(50 + s))
        single.step()
    assert [r["bad"]["rows"] for r in ranks] == [17, 16]
    for r in ranks:
        assert torch.equal(r["bad"]["param"], odd.detach())  # elementwise update: padding changes nothing
        assert r["wrong_world"] is not None and "world size (1)" in r["wrong_world"]
        assert "(32, 32), expected (64, 32)" in r["wrong_world"]
