"""raychat.model's recipe options against nanochat's own GPT: the fixtures in tests/data/peer_<commit>_model were
computed by nanochat 92d63d4 (the 2026-07 recipe) and 07c4dd4 (the seed) on CPU, by bench/peer_fixtures_model.py,
which also holds the formulas for the inputs and the random weights that both sides load.

Bit-equal means equal sha256 of the bytes: the init state dict (keys in order, shapes, dtypes, values), the
logits, the loss and every gradient, in fp32 and in bf16 compute. Sliding windows shorter than T (only the
T 256 config) are compared with the reference's kernel ('masked' SDPA); raychat's default banded kernel
gives the same values up to rounding, measured below.
"""
import functools
import math
from pathlib import Path

import pytest
import torch

from bench.peer_fixtures_model import OPTIMIZER_ARGS, inputs, random_state, sha
from raychat import attention
from raychat.engine import Engine, KVCache
from raychat.model import GPT, RECIPE_OPTIONS, GPTConfig, min_n_embd, window_sizes

DATA = Path(__file__).parent / "data"
PEERS = {"92d63d4": ("float32", "bfloat16"), "07c4dd4": ("float32",)}
CASES = [(peer, path.stem, dtype) for peer, dtypes in PEERS.items()
         for path in sorted((DATA / f"peer_{peer}_model").glob("*.pt")) for dtype in dtypes]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class NoStopTokens:
    """The two ids raychat's Engine stops on, outside every vocabulary here (as the fixtures' peer run)."""

    def encode_special(self, name):
        return -1

    def get_bos_token_id(self):
        return -1


@functools.cache
def fixture(peer: str, name: str) -> dict:
    return torch.load(DATA / f"peer_{peer}_model" / f"{name}.pt", weights_only=True)


def build(fx: dict, dtype: str | None, randomize: bool = True) -> GPT:
    """raychat's GPT for a fixture: its config with its recipe's options, the same seed, the same init call
    (2026-07: the compute-dtype rule; seed: the seed's rule); then the fixture's random weights."""
    torch.manual_seed(fx["seed"])
    with torch.device("meta"):
        model = GPT(GPTConfig(**fx["config"], **RECIPE_OPTIONS[fx["recipe"]]))
    model.to_empty(device="cpu")
    model.init_weights(compute_dtype=DTYPES[dtype] if fx["recipe"] == "2026-07" else None)
    if randomize:
        model.load_state_dict(random_state(model))
    return model


@functools.cache
def run(peer: str, name: str, dtype: str, impl: str | None = "masked") -> dict:
    """What the fixture recorded, computed by raychat with attention kernel `impl`."""
    fx = fixture(peer, name)
    attention.set_attention_impl(impl)
    try:
        model = build(fx, dtype)
        idx, targets = inputs(fx["config"], fx["batch"])
        with torch.no_grad():
            logits = model(idx)
        loss = model(idx, targets)
        loss.backward()
        model.eval()
        ref = fx[dtype]
        engine = Engine(model, NoStopTokens())
        n = fx["new_tokens"]
        return {
            "model": model, "logits": logits, "loss": loss.detach(),
            "grads_sha256": [(k, sha(p.grad)) for k, p in model.named_parameters()],
            "engine_greedy": [c[0] for c, _ in engine.generate(ref["prompt"], 1, n, temperature=0.0)],
            "engine_sampled": [c for c, _ in engine.generate(ref["prompt"], 2, n, temperature=1.0, seed=7)],
            "naive_greedy": list(model.generate(ref["prompt"], n, temperature=0.0)),
        }
    finally:
        attention.set_attention_impl(None)


@pytest.mark.parametrize("peer,name,dtype", CASES)
def test_init_equals_the_peers(peer, name, dtype):
    """Same keys in the same order, shapes, dtypes (bf16 embeddings under bf16 compute) and values."""
    fx = fixture(peer, name)
    model = build(fx, dtype, randomize=False)
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), sha(v)) for k, v in model.state_dict().items()]
    assert got == [tuple(entry) for entry in fx[dtype]["init_state"]]


@pytest.mark.parametrize("peer,name,dtype", CASES)
def test_forward_and_backward_bit_equal_to_the_peers(peer, name, dtype):
    fx, ref = fixture(peer, name), fixture(peer, name)[dtype]
    got = run(peer, name, dtype)
    positions = fx["logit_positions"]
    assert torch.equal(got["logits"][:, positions, :ref["logits_slice"].size(-1)], ref["logits_slice"])
    assert sha(got["logits"]) == ref["logits_sha256"]
    assert torch.equal(got["loss"], ref["loss"])
    assert got["grads_sha256"] == [tuple(g) for g in ref["grads_sha256"]]


@pytest.mark.parametrize("peer,name,dtype", CASES)
def test_sampling_equals_the_peers(peer, name, dtype):
    """The KV-cache Engine (greedy; temperature 1 over 2 rows) and the naive full-forward sampler give the peer's
    tokens. In fp32 the Engine also equals the full forward; in bf16 the cached path rounds differently (in the
    peer too: its two samplers differ on 2 of the 4 configs)."""
    ref, got = fixture(peer, name)[dtype], run(peer, name, dtype)
    assert got["engine_greedy"] == ref["engine_greedy"]
    assert got["engine_sampled"] == [list(column) for column in ref["engine_sampled"]]
    assert got["naive_greedy"] == ref["naive_greedy"]
    if dtype == "float32":
        assert got["engine_greedy"] == got["naive_greedy"]


@pytest.mark.parametrize("peer,name", sorted({(p, n) for p, n, _ in CASES}))
def test_sizes_and_optimizer_groups_equal_the_peers(peer, name):
    fx = fixture(peer, name)
    ref = fx["float32"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**fx["config"], **RECIPE_OPTIONS[fx["recipe"]]))
    assert model.estimate_flops() == ref["estimate_flops"]
    assert model.num_scaling_params() == ref["num_scaling_params"]
    names = {id(p): k for k, p in model.named_parameters()}
    groups = model.optimizer_groups(**OPTIMIZER_ARGS, recipe=fx["recipe"])
    assert len(groups) == len(ref["optimizer_groups"])
    for group, expected in zip(groups, ref["optimizer_groups"]):
        assert [names[id(p)] for p in group["params"]] == expected["params"]
        settings = {k: v for k, v in group.items() if k != "params"}
        assert settings == {k: v for k, v in expected.items() if k != "params"}


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 0.0625)])
def test_banded_attention_matches_the_peers_kernel(dtype, atol):
    """raychat's default sliding-window kernel attends over the band only; against the reference's dense mask
    the logits differ by rounding: measured 1.9e-6 (fp32) and 0.030 (bf16, one bf16 step at |logit| 4.4) at
    most, over the whole (1, 256, 300) logits. atol for bf16 is one bf16 step at the softcap's range [8, 16)."""
    masked, banded = run("92d63d4", "d3_SSSL_T256", dtype), run("92d63d4", "d3_SSSL_T256", dtype, impl=None)
    diff = (banded["logits"] - masked["logits"]).abs()
    assert 0 < diff.max() <= atol and diff.mean() < atol / 50
    assert banded["engine_greedy"] == masked["engine_greedy"]


def small_2026_model(pattern="SL", sequence_len=256, n_kv_head=1, dtype=torch.float32) -> GPT:
    fx = fixture("92d63d4", "d3_SSSL_T256")
    cfg = {**fx["config"], "window_pattern": pattern, "sequence_len": sequence_len, "n_kv_head": n_kv_head}
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(**cfg, **RECIPE_OPTIONS["2026-07"]))
    model.to_empty(device="cpu")
    model.init_weights(compute_dtype=dtype)
    model.load_state_dict(random_state(model))
    return model.eval()


def test_kv_cache_chunks_equal_the_full_forward_with_smear():
    """Prefill 100 tokens, a chunk of 40 (its first token's predecessor comes from the cache), then single
    tokens past the 128-token window: every logit equals the full forward's. Guard: without the cached
    predecessor, the chunk's first position differs."""
    model = small_2026_model()
    idx = torch.randint(0, 300, (2, 150), generator=torch.Generator().manual_seed(1))
    cfg = model.config
    kv = dict(batch_size=2, num_heads=cfg.n_kv_head, seq_len=150, head_dim=cfg.head_dim, num_layers=cfg.n_layer,
              device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = model(idx)
        cache, pos, pieces = KVCache(**kv), 0, []
        for n in [100, 40] + [1] * 10:
            pieces.append(model(idx[:, pos:pos + n], kv_cache=cache))
            pos += n
            torch.testing.assert_close(cache.prev_embedding, model_embedding(model, idx[:, pos - 1:pos]))
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
        cache = KVCache(**kv)
        model(idx[:, :100], kv_cache=cache)
        cache.prev_embedding = None  # forget the predecessor
        chunk = model(idx[:, 100:140], kv_cache=cache)
    assert (chunk[:, 0] - full[:, 100]).abs().max() > 1e-2


def model_embedding(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The normed embedding smear mixes into the next position."""
    from raychat.model import norm
    return norm(model.transformer.wte(idx).to(model.compute_dtype))


def test_kv_cache_keeps_the_previous_embedding():
    cache = KVCache(batch_size=1, num_heads=1, seq_len=8, head_dim=4, num_layers=1, device="cpu",
                    dtype=torch.float32)
    assert cache.prev_embedding is None
    cache.prev_embedding = torch.randn(1, 1, 6)
    cache.advance(3)
    rows = KVCache(batch_size=3, num_heads=1, seq_len=8, head_dim=4, num_layers=1, device="cpu",
                   dtype=torch.float32)
    rows.prefill(cache)
    assert rows.prev_embedding.shape == (3, 1, 6) and torch.equal(rows.prev_embedding[2], cache.prev_embedding[0])
    rows.prev_embedding[0].zero_()  # a copy: the rows do not share it
    assert not torch.equal(rows.prev_embedding[1], rows.prev_embedding[0])
    rows.reset()
    assert rows.prev_embedding is None and rows.get_pos() == 0


def test_engine_cache_takes_the_compute_dtype():
    """A bf16-compute model samples through a bf16 KV cache (the dtype attention emits) without error, and the
    Engine's greedy tokens equal the bit-checked bf16 run's."""
    ref = fixture("92d63d4", "d2_L_gqa")["bfloat16"]
    got = run("92d63d4", "d2_L_gqa", "bfloat16")
    assert got["model"].compute_dtype == torch.bfloat16 and got["model"].cos.dtype == torch.bfloat16
    assert got["engine_greedy"] == ref["engine_greedy"]


def test_compute_dtype_rule_and_seed_rule():
    """None: the seed's rule (fp32 embeddings and bf16 rotary tables on CPU); fp32: everything fp32; fp16:
    embeddings stay fp32 (their gradients must be unscalable), rotary tables and activations fp16."""
    def dtypes(compute_dtype, options):
        with torch.device("meta"):
            model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                                  **options))
        model.to_empty(device="cpu")
        model.init_weights(compute_dtype=compute_dtype)
        return model, (model.transformer.wte.weight.dtype, model.value_embeds["1"].weight.dtype, model.cos.dtype,
                       model.lm_head.weight.dtype)

    f32, b16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert dtypes(None, RECIPE_OPTIONS["seed"])[1] == (f32, f32, b16, f32)
    assert dtypes(None, RECIPE_OPTIONS["2026-07"])[1] == (f32, f32, b16, f32)
    assert dtypes(f32, RECIPE_OPTIONS["2026-07"])[1] == (f32, f32, f32, f32)
    assert dtypes(b16, RECIPE_OPTIONS["2026-07"])[1] == (b16, b16, b16, f32)
    model, got = dtypes(f16, RECIPE_OPTIONS["2026-07"])
    assert got == (f32, f32, f16, f32)
    loss = model(torch.randint(0, 64, (1, 16)), torch.randint(0, 64, (1, 16)))
    assert loss.dtype == f32 and abs(loss.item() - math.log(64)) < 0.1
    loss.backward()
    assert model.transformer.wte.weight.grad.dtype == f32
    with pytest.raises(AssertionError, match="rotary"):  # a model whose tables were made for another dtype
        model.compute_dtype = b16
        model(torch.zeros(1, 4, dtype=torch.long))


def test_recipe_options_and_windows():
    assert RECIPE_OPTIONS["seed"] == {k: v for k, v in vars(GPTConfig()).items() if k in RECIPE_OPTIONS["seed"]}
    assert set(RECIPE_OPTIONS["seed"]) == set(RECIPE_OPTIONS["2026-07"])
    assert min_n_embd(RECIPE_OPTIONS["seed"]) == 32 and min_n_embd(RECIPE_OPTIONS["2026-07"]) == 24
    # A quarter of T rounded up to a multiple of 128: at T 2048, 512 (the S layers), and 128 for any T ≤ 512.
    for T, short in [(2048, 512), (1024, 256), (600, 256), (512, 128), (256, 128), (64, 128)]:
        cfg = GPTConfig(sequence_len=T, n_layer=4, window_pattern="SSSL", **RECIPE_OPTIONS["2026-07"])
        assert window_sizes(cfg) == [(short, 0)] * 3 + [(T, 0)]
    assert window_sizes(GPTConfig(sequence_len=2048, n_layer=2, window_pattern="S"))[0] == (1024, 0)


@pytest.mark.parametrize("field,value,needle", [
    ("short_window", "third", "short_window"), ("init", "2025", "init"), ("qk_scale", 0.0, "qk_scale"),
    ("rope_base", -1.0, "rope_base"), ("ve_gate_range", True, "ve_gate_range"), ("smear", 1, "smear"),
    ("ve_gate_channels", 0, "ve_gate_channels"), ("n_embd", 16, "channels the gates read"),
])
def test_bad_options_raise(field, value, needle):
    kwargs = dict(RECIPE_OPTIONS["2026-07"], n_embd=64, n_head=2, n_kv_head=2)
    kwargs[field] = value
    with pytest.raises(ValueError, match=needle):
        GPTConfig(**kwargs)


def test_2026_optimizer_groups_refuse_adam_betas():
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                              **RECIPE_OPTIONS["2026-07"]))
    with pytest.raises(ValueError, match="adam_betas"):
        model.optimizer_groups(adam_betas=(0.9, 0.95), recipe="2026-07")
    with pytest.raises(ValueError, match="recipe"):
        model.optimizer_groups(recipe="2026-08")
    groups = model.optimizer_groups(recipe="2026-07")
    smear = groups[5]
    assert smear["params"] == [model.smear_gate.weight, model.smear_lambda, model.backout_lambda]
    assert smear["lr"] == 0.2 and smear["weight_decay"] == 0.0
    assert [g["beta2"] for g in groups if g["kind"] == "muon"] == [0.9] * (len(groups) - 6)
