"""raychat.attention: the SDPA fallback against attention written out by hand (docs/REFERENCE.md §6)."""
import math

import pytest
import torch

from raychat import attention
from raychat.attention import flash_attn_func, flash_attn_with_kvcache


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
def test_kvcache_chunks_match_full_attention(window, chunks):
    """Prefill then decode through the cache (single tokens and multi-token chunks) equals one full pass."""
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


def test_override_mechanism():
    try:
        attention.set_attention_impl("sdpa")
        assert attention.current_attention_impl() == "sdpa"
        attention.set_attention_impl(None)
        assert attention.current_attention_impl() == ("fa3" if attention.HAS_FA3 else "sdpa")
        with pytest.raises(ValueError, match="flash"):
            attention.set_attention_impl("flash")
        if not attention.HAS_FA3:
            with pytest.raises(ValueError, match="'fa3' was forced"):
                attention.set_attention_impl("fa3")
    finally:
        attention.set_attention_impl(None)


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
        attention.set_attention_impl("sdpa")
        sdpa = flash_attn_func(q, k, v, window_size=(window, 0))
    finally:
        attention.set_attention_impl(None)
    torch.testing.assert_close(fa3.float(), sdpa.float(), atol=1e-2, rtol=1e-2)
