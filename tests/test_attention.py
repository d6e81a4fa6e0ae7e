"""raychat.attention: the kernels without FA3 against attention written out by hand and against the
reference's dense masked SDPA (docs/REFERENCE.md §6)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from raychat import attention
from raychat.attention import flash_attn_func, flash_attn_with_kvcache
from raychat.model import GPTConfig, window_sizes


def reference_attention(q, k, v, window):
    """Causal attention with an explicit loop-built mask. (B, Tq, H, D) q, (B, Tk, Hkv, D) k/v; the Tq
    queries are the last Tq positions of the Tk keys; window < 0 means unlimited."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    allowed = torch.zeros(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        p = Tk - Tq + i
        for j in range(Tk):
            allowed[i, j] = j <= p and (window < 0 or p - j <= window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def qkv(B=2, T=24, H=4, Hkv=2, D=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)]
    return [torch.randn(s, generator=g).requires_grad_(requires_grad) for s in shapes]


@pytest.fixture
def impl():
    """Force an attention kernel for one test; automatic selection is restored afterwards."""
    yield attention.set_attention_impl
    attention.set_attention_impl(None)


@pytest.fixture(params=[3, 8], ids=lambda b: f"block{b}")
def small_blocks(request, monkeypatch):
    """Banded query blocks small enough that the tests' short sequences span several of them."""
    monkeypatch.setattr(attention, "BAND_BLOCK", request.param)
    return request.param


def forward_and_grads(q, k, v, window):
    """flash_attn_func's output and the gradients of q, k and v for a fixed random upstream gradient."""
    q, k, v = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    y = flash_attn_func(q, k, v, window_size=(window, 0))
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device, y.dtype))
    return [y.detach()] + [t.grad for t in (q, k, v)]


@pytest.mark.parametrize("window", [-1, 24, 23, 12, 5, 1, 0])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_training_attention_matches_explicit_mask(window, heads):
    H, Hkv = heads
    q, k, v = qkv(H=H, Hkv=Hkv)
    y = flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    assert y.shape == q.shape
    torch.testing.assert_close(y, reference_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_window_actually_restricts_attention():
    # A window-5 layer must differ from full attention at late positions and agree at early ones.
    q, k, v = qkv()
    full = flash_attn_func(q, k, v, window_size=(-1, -1))
    windowed = flash_attn_func(q, k, v, window_size=(5, 0))
    torch.testing.assert_close(windowed[:, :6], full[:, :6])
    assert (windowed[:, 6:] - full[:, 6:]).abs().max() > 1e-3


def test_masked_path_gradients_match_reference():
    q, k, v = qkv(requires_grad=True)
    flash_attn_func(q, k, v, window_size=(7, 0)).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    reference_attention(q2, k2, v2, 7).square().sum().backward()
    for a, b in zip(got, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [-1, 32, 8, 3])
@pytest.mark.parametrize("chunks", [[32, 1, 1, 1], [10, 7, 1, 5, 9], [1] * 40])
def test_kvcache_chunks_match_full_attention(window, chunks, small_blocks):
    """Prefill then decode through the cache (single tokens and multi-token chunks, several banded blocks
    each) equals one full pass."""
    T = sum(chunks)
    q, k, v = qkv(B=2, T=T, H=4, Hkv=2, D=8, seed=1)
    expected = reference_attention(q, k, v, window)
    k_cache = torch.zeros(2, T + 3, 2, 8)
    v_cache = torch.zeros(2, T + 3, 2, 8)
    seqlens = torch.zeros(2, dtype=torch.int32)
    pos = 0
    for n in chunks:
        y = flash_attn_with_kvcache(q[:, pos:pos + n], k_cache, v_cache, k=k[:, pos:pos + n], v=v[:, pos:pos + n],
                                    cache_seqlens=seqlens, window_size=(window, 0))
        torch.testing.assert_close(y, expected[:, pos:pos + n], atol=1e-5, rtol=1e-5)
        assert seqlens.tolist() == [pos, pos], "the attention call must not advance the position"
        pos += n
        seqlens += n
    torch.testing.assert_close(k_cache[:, :T], k)
    torch.testing.assert_close(v_cache[:, :T], v)
    assert k_cache[:, T:].abs().sum() == 0


def test_single_token_decode_respects_window():
    # Regression of the reference's tests: SDPA once ignored the window while decoding.
    q, k, v = qkv(B=1, T=33, H=2, Hkv=2, D=8, seed=3)
    k_cache, v_cache = torch.zeros(1, 40, 2, 8), torch.zeros(1, 40, 2, 8)
    k_cache[:, :32], v_cache[:, :32] = k[:, :32], v[:, :32]
    y = flash_attn_with_kvcache(q[:, 32:], k_cache, v_cache, k=k[:, 32:], v=v[:, 32:],
                                cache_seqlens=torch.tensor([32], dtype=torch.int32), window_size=(8, 0))
    torch.testing.assert_close(y, reference_attention(q, k, v, 8)[:, 32:], atol=1e-5, rtol=1e-5)
    unwindowed = reference_attention(q, k, v, -1)[:, 32:]
    assert (y - unwindowed).abs().max() > 1e-3


def test_cache_overflow_and_bad_arguments_raise():
    q, k, v = qkv(B=1, T=4, H=2, Hkv=2, D=8)
    k_cache, v_cache = torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 2, 8)
    with pytest.raises(ValueError, match="overflow"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=torch.tensor([2], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v)
    with pytest.raises(ValueError, match="causal=False"):
        flash_attn_func(q, k, v, causal=False)


def test_override_mechanism(impl):
    auto = attention.current_attention_impl("cpu")
    assert auto == "banded", "sliding windows on CPU must not run the dense masked kernel by default"
    impl("masked")
    assert attention.current_attention_impl("cpu") == "masked"
    impl("sdpa")
    assert attention.current_attention_impl("cpu") == attention.current_attention_impl("cuda") == "banded"
    impl(None)
    assert attention.current_attention_impl("cuda") == (
        "fa3" if attention.HAS_FA3 else "flex" if attention.HAS_FLEX else "banded")
    with pytest.raises(ValueError, match="flash"):
        impl("flash")
    if not attention.HAS_FA3:
        with pytest.raises(ValueError, match="'fa3' was forced"):
            impl("fa3")
    if not attention.HAS_FLEX:
        with pytest.raises(ValueError, match="'flex' was forced"):
            impl("flex")


def test_no_fa3_without_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        assert attention.HAS_FA3 is False


@pytest.mark.skipif(not attention.HAS_FA3, reason="FA3 needs a Hopper GPU with flash_attn_interface or kernels")
@pytest.mark.parametrize("window", [-1, 64, 16])
def test_fa3_matches_sdpa(window):
    q, k, v = [t.cuda().bfloat16() for t in qkv(B=2, T=128, H=4, Hkv=2, D=64)]
    try:
        attention.set_attention_impl("fa3")
        fa3 = flash_attn_func(q, k, v, window_size=(window, 0))
        attention.set_attention_impl("masked")
        sdpa = flash_attn_func(q, k, v, window_size=(window, 0))
    finally:
        attention.set_attention_impl(None)
    torch.testing.assert_close(fa3.float(), sdpa.float(), atol=1e-2, rtol=1e-2)


# ---- Sliding windows without FA3: banded SDPA (CPU), FlexAttention (CUDA), the reference's dense mask ----

@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("T,window", [(24, 12), (24, 5), (24, 0), (24, 1), (24, 22), (24, 30),
                                      (23, 8), (9, 4), (5, 3), (2, 0), (40, 15)])
def test_banded_equals_dense_mask_fp32(T, window, heads, small_blocks, impl):
    # Forward and all three gradients, T a multiple of the block or not, T under the window, window 0.
    H, Hkv = heads
    q, k, v = qkv(T=T, H=H, Hkv=Hkv, seed=T + window)
    banded = forward_and_grads(q, k, v, window)
    impl("masked")
    dense = forward_and_grads(q, k, v, window)
    for got, want in zip(banded, dense):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(banded[0], reference_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa2"])
@pytest.mark.parametrize("window", [16, 7, 0])
def test_banded_equals_dense_mask_bf16_autocast(window, heads, small_blocks, impl):
    # CPU autocast runs both in bf16; the difference is rounding, at bf16's precision.
    H, Hkv = heads
    q, k, v = qkv(T=37, H=H, Hkv=Hkv, D=32, seed=window)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        banded = forward_and_grads(q, k, v, window)
        impl("masked")
        dense = forward_and_grads(q, k, v, window)
    assert banded[0].dtype == torch.bfloat16
    for got, want in zip(banded, dense):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_banded_computes_only_the_band(monkeypatch, impl):
    # The point of the banded path: no SDPA call sees more keys than the window plus one block, and the scores
    # computed in all add up to about the band, well under the T x T square the dense mask costs.
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, **kwargs):
        calls.append((q.size(2), k.size(2), kwargs.get("is_causal", False)))
        return real_sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(attention, "BAND_BLOCK", 16)
    T, window = 128, 32
    q, k, v = qkv(T=T)
    y = flash_attn_func(q, k, v, window_size=(window, 0))
    torch.testing.assert_close(y, reference_attention(q, k, v, window), atol=1e-5, rtol=1e-5)
    assert calls[0] == (window + 1, window + 1, True), "the first window + 1 queries are one causal square"
    assert all(n_k <= window + 16 for _, n_k, _ in calls[1:])
    scores = sum(n_q * n_k // (2 if causal else 1) for n_q, n_k, causal in calls)
    assert scores < 0.4 * T * T
    calls.clear()
    impl("masked")
    flash_attn_func(q, k, v, window_size=(window, 0))
    assert calls == [(T, T, False)], "'masked' is the reference's single T x T call"


def test_full_window_takes_the_causal_kernel(monkeypatch):
    # 'L' layers pass (T, 0): a window covering every key is plain causal attention, never banded.
    monkeypatch.setattr(attention, "_banded_sdpa", None)
    q, k, v = qkv(T=24)
    for window in (-1, 23, 24, 100):
        torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(window, 0)),
                                   reference_attention(q, k, v, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa2"])
@pytest.mark.parametrize("T,window", [(40, 15), (33, 0), (130, 64)])
def test_flex_block_mask_equals_dense_mask(T, window, heads):
    # FlexAttention trains only on CUDA; its forward runs eagerly on CPU, which checks the block mask and the
    # call here (the CUDA test below checks the compiled kernel and its gradients).
    H, Hkv = heads
    q, k, v = [t.transpose(1, 2) for t in qkv(T=T, H=H, Hkv=Hkv, seed=T)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        y = attention._flex_sliding(q, k, v, window, compiled=False)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=attention._band_mask(0, T, T, window, q.device),
                                           enable_gqa=H != Hkv)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not attention.HAS_FLEX, reason="FlexAttention trains only on CUDA with Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa2"])
@pytest.mark.parametrize("T,window", [(256, 128), (200, 100), (300, 37)])
def test_flex_equals_dense_mask_cuda(T, window, heads, dtype, impl):
    H, Hkv = heads
    q, k, v = [t.cuda().to(dtype) for t in qkv(T=T, H=H, Hkv=Hkv, D=64, seed=T)]
    if attention.HAS_FA3:
        impl("flex")
    assert attention._kernel(True, dtype) == "flex"
    flex = forward_and_grads(q, k, v, window)
    impl("masked")
    dense = forward_and_grads(q, k, v, window)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3  # fp32 allows for TF32 matmuls
    for got, want in zip(flex, dense):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not attention.HAS_FLEX, reason="FlexAttention trains only on CUDA with Triton")
def test_flex_inside_a_compiled_function_cuda(impl):
    # The model is compiled on CUDA: the block mask is then built inside the compiled graph.
    q, k, v = [t.cuda().bfloat16() for t in qkv(T=256, H=4, Hkv=4, D=64)]
    if attention.HAS_FA3:
        impl("flex")
    compiled = torch.compile(flash_attn_func, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        compiled(*got, window_size=(128, 0)).square().sum().backward()
        impl("masked")
        want = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        flash_attn_func(*want, window_size=(128, 0)).square().sum().backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=5e-2, rtol=5e-2)


def test_attention_path_names_each_layer_kind(impl):
    sssl = window_sizes(GPTConfig(sequence_len=64, n_layer=4, window_pattern="SSSL"))
    only_l = window_sizes(GPTConfig(sequence_len=64, n_layer=4, window_pattern="L"))
    path = attention.attention_path
    assert path(sssl, 64, "cpu") == "banded SDPA (sliding windows), SDPA causal (full)"
    assert path(only_l, 64, "cpu") == "SDPA causal (full)"
    cuda = path(sssl, 64, "cuda")
    assert cuda == ("FA3" if attention.HAS_FA3 else "FlexAttention (sliding windows), SDPA causal (full)"
                    if attention.HAS_FLEX else "banded SDPA (sliding windows), SDPA causal (full)")
    assert "WARNING" not in cuda
    impl("masked")
    assert path(sssl, 64, "cpu").startswith("dense masked SDPA (sliding windows), SDPA causal (full) "
                                            "[forced: masked] | WARNING: ")
    assert "WARNING" not in path(only_l, 64, "cpu"), "full context needs no mask: nothing to warn about"
    impl("sdpa")
    assert path(sssl, 64, "cuda") == "banded SDPA (sliding windows), SDPA causal (full) [forced: sdpa]"
