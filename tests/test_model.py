"""raychat.model: sizes, initialisation, state-dict layout, forward/KV-cache agreement, optimizer groups."""
import math

import pytest
import torch

from raychat.engine import KVCache
from raychat.model import GPT, GPTConfig, apply_rotary_emb, norm, window_sizes

# The reference's d20-d26 shapes (V = 32768, T = 2048, SSSL, head_dim 128).
SIZE_TABLE = {
    # depth: (d, heads, wte, value_embeds, lm_head, transformer_matrices, scalars, total, scaling, flops)
    12: (768, 6, 25_165_824, 150_994_944, 25_165_824, 84_935_808, 24, 286_262_424, 110_101_632, 802_167_552),
    20: (1280, 10, 41_943_040, 419_430_400, 41_943_040, 393_219_200, 40, 896_535_720, 435_162_240,
         3_004_189_440),
    24: (1536, 12, 50_331_648, 603_979_776, 50_331_648, 679_481_856, 48, 1_384_124_976, 729_813_504,
         4_945_112_064),
    26: (1664, 13, 54_525_952, 708_837_376, 54_525_952, 863_900_960, 52, 1_681_790_292, 918_426_912,
         6_185_320_128),
}


def meta_model(depth: int) -> GPT:
    d, h = SIZE_TABLE[depth][:2]
    with torch.device("meta"):
        return GPT(GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=depth, n_head=h, n_kv_head=h, n_embd=d))


def small_model(n_layer=3, vocab_size=100, n_embd=64, n_head=4, n_kv_head=2, sequence_len=16, pattern="SL",
                randomize=True, seed=0) -> GPT:
    """A real CPU model. With randomize, every parameter is random (init zeros the projections, which would
    hide attention and MLP from the comparisons)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                    n_kv_head=n_kv_head, n_embd=n_embd, window_pattern=pattern)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 1 / math.sqrt(p.size(-1))) + (p.dim() == 1))
    return model


@pytest.mark.parametrize("depth", sorted(SIZE_TABLE))
def test_sizes_match_spec_table(depth):
    model = meta_model(depth)
    _, _, wte, ve, lm_head, matrices, scalars, total, scaling, flops = SIZE_TABLE[depth]
    counts = model.num_scaling_params()
    assert counts == {"wte": wte, "value_embeds": ve, "lm_head": lm_head, "transformer_matrices": matrices,
                      "scalars": scalars, "total": total}
    assert counts["transformer_matrices"] + counts["lm_head"] == scaling
    assert model.estimate_flops() == flops
    assert len(model.value_embeds) == math.ceil(depth / 2)


def test_window_pattern_layers():
    # SSSL tiles the layers, with the last layer forced long.
    for depth, long_layers in [(12, [3, 7, 11]), (20, [3, 7, 11, 15, 19]), (24, [3, 7, 11, 15, 19, 23]),
                               (26, [3, 7, 11, 15, 19, 23, 25])]:
        sizes = meta_model(depth).window_sizes
        assert [i for i, w in enumerate(sizes) if w == (2048, 0)] == long_layers
        assert all(w == (1024, 0) for i, w in enumerate(sizes) if i not in long_layers)
    cfg = GPTConfig(sequence_len=100, n_layer=3, window_pattern="s")  # lower case is accepted
    assert window_sizes(cfg) == [(50, 0), (50, 0), (100, 0)]


def expected_state_dict(L, V, d, H, Hkv):
    """The reference's keys in state-dict order. PyTorch lists a module's own parameters before its submodules',
    so the two lambdas come first, as in the reference (same registration order)."""
    Dh = d // H
    entries = [("resid_lambdas", (L,)), ("x0_lambdas", (L,)), ("transformer.wte.weight", (V, d))]
    for i in range(L):
        p = f"transformer.h.{i}."
        entries += [(p + "attn.c_q.weight", (H * Dh, d)), (p + "attn.c_k.weight", (Hkv * Dh, d)),
                    (p + "attn.c_v.weight", (Hkv * Dh, d)), (p + "attn.c_proj.weight", (d, d))]
        if i % 2 == (L - 1) % 2:
            entries.append((p + "attn.ve_gate.weight", (Hkv, 32)))
        entries += [(p + "mlp.c_fc.weight", (4 * d, d)), (p + "mlp.c_proj.weight", (d, 4 * d))]
    entries += [("lm_head.weight", (V, d))]
    entries += [(f"value_embeds.{i}.weight", (V, Hkv * Dh)) for i in range(L) if i % 2 == (L - 1) % 2]
    return entries


@pytest.mark.parametrize("n_layer", [3, 4])
def test_state_dict_layout(n_layer):
    # vocab 100 pads to 128; the rotary tables are not saved.
    model = small_model(n_layer=n_layer, randomize=False)
    sd = model.state_dict()
    assert [(k, tuple(t.shape)) for k, t in sd.items()] == expected_state_dict(n_layer, 128, 64, 4, 2)
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert "cos" not in sd and "sin" not in sd
    ve_layers = sorted(int(k) for k in model.value_embeds)
    assert ve_layers == ([0, 2] if n_layer == 3 else [1, 3])


def test_init_statistics():
    model = small_model(n_layer=3, vocab_size=4000, n_embd=256, n_head=2, n_kv_head=2, randomize=False)
    s = math.sqrt(3) / math.sqrt(256)
    wte = model.transformer.wte.weight
    assert abs(wte.mean().item()) < 0.01 and abs(wte.std().item() - 1.0) < 0.01
    assert abs(model.lm_head.weight.std().item() - 0.001) < 2e-5
    uniform = [w for b in model.transformer.h for w in (b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight,
                                                        b.mlp.c_fc.weight)]
    uniform += [ve.weight for ve in model.value_embeds.values()]
    for w in uniform:
        assert w.abs().max().item() <= s
        assert abs(w.std().item() - 1 / 16) < 0.002
        assert abs(w.mean().item()) < 0.002
    zeros = [w for b in model.transformer.h for w in (b.attn.c_proj.weight, b.mlp.c_proj.weight)]
    zeros += [b.attn.ve_gate.weight for b in model.transformer.h if b.attn.ve_gate is not None]
    assert len(zeros) == 3 * 2 + 2 and all(torch.count_nonzero(w) == 0 for w in zeros)
    assert torch.equal(model.resid_lambdas, torch.ones(3))
    assert torch.equal(model.x0_lambdas, torch.full((3,), 0.1))


def test_init_draw_order_matches_reference():
    # Bit-exact: the same draws in the reference's order (wte, lm_head, per block c_q c_k c_v c_fc, then VEs).
    model = small_model(n_layer=2, randomize=False, seed=7)
    torch.manual_seed(7)
    s = math.sqrt(3) / math.sqrt(64)
    expected = [torch.empty(128, 64).normal_(0, 1), torch.empty(128, 64).normal_(0, 0.001)]
    for _ in range(2):
        expected += [torch.empty(64, 64).uniform_(-s, s), torch.empty(32, 64).uniform_(-s, s),
                     torch.empty(32, 64).uniform_(-s, s), torch.empty(256, 64).uniform_(-s, s)]
    expected.append(torch.empty(128, 32).uniform_(-s, s))
    h = model.transformer.h
    got = [model.transformer.wte.weight, model.lm_head.weight]
    for b in h:
        got += [b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight, b.mlp.c_fc.weight]
    got.append(model.value_embeds["1"].weight)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


def test_rotary_tables_and_direction():
    model = small_model(n_layer=1, randomize=False)
    assert model.cos.dtype == torch.bfloat16 and model.cos.shape == (1, 160, 1, 8)
    Dh = 16
    angles = torch.arange(160).float()[:, None] / 10000 ** (torch.arange(0, Dh, 2).float() / Dh)
    torch.testing.assert_close(model.cos[0, :, 0].float(), angles.cos(), atol=4e-3, rtol=0)
    torch.testing.assert_close(model.sin[0, :, 0].float(), angles.sin(), atol=4e-3, rtol=0)
    # "Split halves" rotates channel pair (j, j + Dh/2) by −θ: (x1 + i·x2)·e^{−iθ}.
    x = torch.randn(1, 5, 1, Dh)
    theta = torch.rand(1, 5, 1, Dh // 2) * 6
    y = apply_rotary_emb(x, theta.cos(), theta.sin())
    z = torch.complex(x[..., :8], x[..., 8:]) * torch.exp(-1j * theta)
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], dim=-1), atol=1e-5, rtol=1e-5)


def test_norm_keeps_dtype_and_is_parameter_free():
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = x.float() / x.float().pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("field,value,needle", [
    ("n_embd", 100, "n_embd"), ("n_head", 0, "n_head"), ("n_kv_head", 4, "n_kv_head"),
    ("n_kv_head", 12, "n_kv_head"), ("window_pattern", "SSXL", "window_pattern"),
    ("window_pattern", "", "window_pattern"), ("sequence_len", -1, "sequence_len"),
    ("vocab_size", 0, "vocab_size"), ("n_layer", 0, "n_layer"),
])
def test_bad_config_raises(field, value, needle):
    kwargs = dict(n_embd=96, n_head=6, n_kv_head=6)
    kwargs[field] = value
    with pytest.raises(ValueError, match=needle):
        GPTConfig(**kwargs)


def test_loss_at_init_is_log_vocab_and_reductions():
    model = small_model(n_layer=2, vocab_size=1000, randomize=False)
    idx = torch.randint(0, 1000, (2, 16))
    targets = torch.randint(0, 1000, (2, 16))
    loss = model(idx, targets)
    assert abs(loss.item() - math.log(1000)) < 0.01
    logits = model(idx)
    assert logits.shape == (2, 16, 1000) and logits.dtype == torch.float32  # sliced back from 1024
    targets[0, :5] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (32,) and torch.all(per_token[:5] == 0)
    torch.testing.assert_close(model(idx, targets), per_token[5:].mean())


def test_softcap_bounds_logits():
    model = small_model(n_layer=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits = model(torch.randint(0, 100, (1, 8)))
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


@pytest.mark.parametrize("pattern,n_kv_head", [("L", 4), ("S", 2), ("SSL", 1)])
def test_kv_cache_decode_matches_full_forward(pattern, n_kv_head):
    """Prefill 5 tokens, then a 3-token chunk, then single tokens: every logit equals the full forward."""
    model = small_model(n_layer=3, n_kv_head=n_kv_head, pattern=pattern, sequence_len=16)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(batch_size=2, num_heads=n_kv_head, seq_len=16, head_dim=16, num_layers=3, device="cpu",
                        dtype=torch.float32)
        pos, pieces = 0, []
        for n in [5, 3] + [1] * 8:
            pieces.append(model(idx[:, pos:pos + n], kv_cache=cache))
            pos += n
            assert cache.get_pos() == pos
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_windowed_layers_change_the_output():
    # Guard for the test above: with T = 16 an S layer (window 8) must actually differ from full attention.
    short = small_model(n_layer=2, pattern="S", sequence_len=16)
    long = small_model(n_layer=2, pattern="L", sequence_len=16)
    idx = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        a, b = short(idx), long(idx)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-5, rtol=1e-5)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


def test_sequence_longer_than_rotary_raises():
    model = small_model(n_layer=1, sequence_len=4, randomize=False)
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_d2_overfits_one_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    data = torch.randint(0, 256, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(first - math.log(256)) < 0.05
    assert loss.item() < 0.2 * first  # measured: 5.55 → 0.25


def test_optimizer_groups_d24():
    model = meta_model(24)
    groups = model.optimizer_groups(embedding_lr=0.3, weight_decay=0.05)  # base_train's defaults
    assert [g["kind"] for g in groups] == ["adamw"] * 5 + ["muon"] * 4
    assert groups[0]["params"] == [model.lm_head.weight]
    assert groups[1]["params"] == [model.transformer.wte.weight]
    assert groups[2]["params"] == [model.value_embeds[str(i)].weight for i in range(1, 24, 2)]
    assert groups[3]["params"] == [model.resid_lambdas] and groups[4]["params"] == [model.x0_lambdas]
    for g, lr in zip(groups, [0.0028284, 0.21213, 0.21213, 0.005, 0.5, 0.02, 0.02, 0.02, 0.02]):
        assert g["lr"] == pytest.approx(lr, rel=1e-4) and g["initial_lr"] == g["lr"]
    assert [g["betas"] for g in groups[:5]] == [(0.8, 0.95)] * 4 + [(0.96, 0.95)]
    assert all(g["eps"] == 1e-10 and g["weight_decay"] == 0.0 for g in groups[:5])
    muon = groups[5:]
    assert [(tuple(g["params"][0].shape), len(g["params"])) for g in muon] == [
        ((12, 32), 12), ((1536, 1536), 96), ((1536, 6144), 24), ((6144, 1536), 24)]
    assert all(g["momentum"] == 0.95 and g["ns_steps"] == 5 and g["beta2"] == 0.95 and g["weight_decay"] == 0.05
               for g in muon)
    h = model.transformer.h
    assert muon[1]["params"][:5] == [h[0].attn.c_q.weight, h[0].attn.c_k.weight, h[0].attn.c_v.weight,
                                     h[0].attn.c_proj.weight, h[1].attn.c_q.weight]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_build_optimizer_picks_single_or_distributed_muon_adamw():
    """The training module, not the model, chooses the optimizer: MuonAdamW alone, DistMuonAdamW across ranks."""
    from raychat.config import TrainConfig, derive
    from raychat.loop import build_optimizer
    from raychat.optim import MuonAdamW

    model = small_model(n_layer=2, randomize=False)
    cfg = TrainConfig(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, num_iterations=1)
    plan = derive(cfg, 128, 1)
    opt = build_optimizer(model, cfg, plan, world_size=1, compile_kernels=False)
    assert type(opt) is MuonAdamW
    assert len(opt.param_groups) == len(model.optimizer_groups())
    assert all("initial_lr" in g for g in opt.param_groups)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA precision path")
def test_cuda_bf16_dataflow():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
    model.to_empty(device="cuda")
    model.init_weights()
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert all(ve.weight.dtype == torch.bfloat16 for ve in model.value_embeds.values())
    assert model.lm_head.weight.dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.randn(2, 8, 128, device="cuda", dtype=torch.bfloat16)
        assert norm(x).dtype == torch.bfloat16
        logits = model(torch.randint(0, 128, (2, 64), device="cuda"))
    assert logits.dtype == torch.float32
