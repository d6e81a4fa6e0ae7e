"""Causal attention with FlashAttention-3 when it is there, PyTorch SDPA otherwise (docs/REFERENCE.md §6).

Both entry points take and return FA3's layout, (batch, time, heads, head_dim), so model code never
transposes. Window sizes follow FA3: `window_size=(left, right)`, a query at position p attends to keys
[p - left, p] (right is always 0 here); left < 0 means unlimited.

FA3 is detected once, at import: it needs a Hopper GPU (compute capability 9.x; Ada and Blackwell are
excluded on purpose, as in the reference) and either an installed `flash_attn_interface` module or the
HuggingFace `kernels` hub kernel `varunneal/flash-attention-3`. Any failure means "not available".
Tests can force a backend with `set_attention_impl('sdpa' | 'fa3' | None)`.
"""
import os

import torch
import torch.nn.functional as F


def _load_fa3():
    """FA3's `flash_attn_interface` module, or None. Never raises."""
    try:
        if not torch.cuda.is_available():
            return None
        major, _ = torch.cuda.get_device_capability()
        if major != 9:
            return None
        try:
            # A locally installed build needs no network, so it is tried before the hub kernel.
            import flash_attn_interface  # type: ignore[import-not-found]
            return flash_attn_interface
        except Exception:
            pass
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel  # type: ignore[import-not-found]
        return get_kernel("varunneal/flash-attention-3").flash_attn_interface
    except Exception:
        return None


_fa3 = _load_fa3()
HAS_FA3 = _fa3 is not None

# None = automatic (FA3 when available), 'fa3' or 'sdpa' = forced. Changed only via set_attention_impl.
_override_impl: str | None = None
_IMPLS = (None, "fa3", "sdpa")


def set_attention_impl(impl: str | None) -> None:
    """Force a backend: 'sdpa', 'fa3' (only where HAS_FA3) or None for automatic selection."""
    global _override_impl
    if impl not in _IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {_IMPLS}; pass 'sdpa', 'fa3' or None")
    if impl == "fa3" and not HAS_FA3:
        raise ValueError("attention impl 'fa3' was forced but FlashAttention-3 is not available "
                         "(it needs a Hopper GPU and flash_attn_interface or the `kernels` package); use 'sdpa'")
    _override_impl = impl


def current_attention_impl() -> str:
    """'fa3' or 'sdpa': what the next call will use for bf16 CUDA inputs."""
    if _override_impl is not None:
        return _override_impl
    return "fa3" if HAS_FA3 else "sdpa"


def _use_fa3(q: torch.Tensor) -> bool:
    # FA3 runs only bf16 CUDA tensors; fp32 inputs (an eval without autocast, say) go to SDPA rather than
    # crash. The reference passed them through; nanochat's later versions also restrict FA3 to bf16.
    return current_attention_impl() == "fa3" and q.is_cuda and q.dtype == torch.bfloat16


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal SDPA on (B, H, T, D) tensors. The last Tq keys are aligned with the Tq queries.

    Three paths, as the reference (docs/REFERENCE.md §6): the is_causal fast path when the window covers the whole
    square; a single decoding query that just drops keys outside its window; an explicit boolean mask
    for everything else (sliding windows in training, chunked prefill into a cache).
    """
    Tq, Tk = q.size(2), k.size(2)
    enable_gqa = q.size(1) != k.size(1)
    if (window < 0 or window >= Tq) and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:
        if 0 <= window < Tk:
            start = Tk - (window + 1)
            k, v = k[:, :, start:], v[:, :, start:]
        return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=enable_gqa)
    q_pos = (Tk - Tq) + torch.arange(Tq, device=q.device).unsqueeze(1)
    k_pos = torch.arange(Tk, device=q.device).unsqueeze(0)
    mask = k_pos <= q_pos
    if 0 <= window < Tk:
        mask = mask & (q_pos - k_pos <= window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def _check_causal(causal: bool, window_size: tuple[int, int]) -> None:
    if not causal:
        raise ValueError("causal=False is not supported: the SDPA fallback implements causal attention only")
    if len(window_size) != 2 or window_size[1] not in (0, -1):
        raise ValueError(f"window_size={window_size!r}: expected (left, 0) or (-1, -1); "
                         "a right-hand window makes no sense for causal attention")


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Training attention. q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0. Returns (B, T, H, D)."""
    if _use_fa3(q):
        return _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    _check_causal(causal, window_size)
    y = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size[0])
    return y.transpose(1, 2)


def flash_attn_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                            cache_seqlens: torch.Tensor | None = None, causal: bool = True,
                            window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Inference attention over a cache. q, k, v: (B, Tnew, H or Hkv, D); caches: (B, Tmax, Hkv, D).

    Writes k and v into the caches in place at position cache_seqlens[0] (the whole batch shares one
    position) and attends q over cache[:, :pos + Tnew]. It does not advance the position: the caller
    does, once per forward pass, after the last layer (raychat.engine).
    """
    if _use_fa3(q):
        return _fa3.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                            causal=causal, window_size=window_size)
    _check_causal(causal, window_size)
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is None: pass the (B,) int32 positions of the cache (KVCache.cache_seqlens)")
    pos = int(cache_seqlens[0].item())
    t_new = q.size(1)
    end = pos + t_new
    if end > k_cache.size(1):
        raise ValueError(f"KV cache overflow: position {pos} + {t_new} new tokens > capacity {k_cache.size(1)}; "
                         "allocate a longer KVCache")
    if k is not None and v is not None:
        k_cache[:, pos:end] = k
        v_cache[:, pos:end] = v
    y = _sdpa(q.transpose(1, 2), k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2),
              window_size[0])
    return y.transpose(1, 2)
