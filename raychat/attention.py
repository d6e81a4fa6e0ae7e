"""Causal attention with FlashAttention-3 when it is there, PyTorch kernels otherwise (docs/REFERENCE.md §6).

Both entry points take and return FA3's layout, (batch, time, heads, head_dim), so model code never
transposes. Window sizes follow FA3: `window_size=(left, right)`, a query at position p attends to keys
[p - left, p] (right is always 0 here); left < 0 means unlimited.

Kernels, first that applies (`attention_path` says which in one line):
- FA3 for bf16 CUDA tensors. Detected once, at import: it needs a Hopper GPU (compute capability 9.x; Ada
  and Blackwell are excluded on purpose, as in the reference) and either an installed
  `flash_attn_interface` module or the HuggingFace `kernels` hub kernel `varunneal/flash-attention-3`.
  Any failure means "not available".
- SDPA's causal kernel for every full-context layer.
- Sliding windows on CUDA: FlexAttention with a sliding-window block mask, compiled, so the blocks
  outside the band are skipped.
- Sliding windows elsewhere (CPU; FlexAttention has no CPU backward): "banded" SDPA, which attends each
  block of queries over the keys its window reaches and never computes the rest of the T x T square.
The reference instead runs sliding windows as SDPA with a dense T x T mask, all the work of full attention
and a slower kernel; `set_attention_impl('masked')` restores that for comparisons.
"""
import functools
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


def _has_flex() -> bool:
    """FlexAttention can train here: it needs CUDA, and Triton for the compiled kernel (it has no CPU backward)."""
    try:
        from torch.utils._triton import has_triton
        return torch.cuda.is_available() and has_triton()
    except Exception:
        return False


HAS_FLEX = _has_flex()

# Queries per block of the banded path. Smaller blocks waste less of each block's key range on masked
# scores, larger ones make fewer, better-parallelised calls: forward + backward, B 2 x 4 heads x T 2048 x
# head dim 64, windows T/2 and T/4, on 1 and 2 CPU threads, 192 and 256 tie, 64, 128 and 384 are no better
# (bench/bench_attention.py --blocks).
BAND_BLOCK = 256

# None = automatic; otherwise one of the kernels below, forced. Changed only via set_attention_impl.
_override_impl: str | None = None
_IMPLS = (None, "fa3", "flex", "sdpa", "masked")


def set_attention_impl(impl: str | None) -> None:
    """Force a kernel, for tests and benchmarks, or None for automatic selection.

    'fa3' (only where HAS_FA3); 'flex': sliding windows through FlexAttention on CUDA (only where HAS_FLEX);
    'sdpa': SDPA only, banded for sliding windows; 'masked': SDPA with the reference's dense T x T mask for
    sliding windows. Full-context layers run SDPA's causal kernel under every setting but 'fa3'.
    """
    global _override_impl
    if impl not in _IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {_IMPLS}; "
                         "pass 'fa3', 'flex', 'sdpa', 'masked' or None")
    if impl == "fa3" and not HAS_FA3:
        raise ValueError("attention impl 'fa3' was forced but FlashAttention-3 is not available "
                         "(it needs a Hopper GPU and flash_attn_interface or the `kernels` package); use 'sdpa'")
    if impl == "flex" and not HAS_FLEX:
        raise ValueError("attention impl 'flex' was forced but FlexAttention cannot train here "
                         "(it needs a CUDA GPU and Triton); use 'sdpa'")
    _override_impl = impl


def _kernel(is_cuda: bool, dtype: torch.dtype) -> str:
    """'fa3', 'flex', 'banded' or 'masked': what runs a sliding-window layer for inputs like these."""
    impl = _override_impl
    # FA3 runs only bf16 CUDA tensors; fp32 inputs (an eval without autocast, say) take the next kernel rather
    # than crash. The reference passed them through; nanochat's later versions also restrict FA3 to bf16.
    if HAS_FA3 and impl in (None, "fa3") and is_cuda and dtype == torch.bfloat16:
        return "fa3"
    if impl == "masked":
        return "masked"
    if HAS_FLEX and impl in (None, "fa3", "flex") and is_cuda:
        return "flex"
    return "banded"


def current_attention_impl(device_type: str = "cuda") -> str:
    """'fa3', 'flex', 'banded' or 'masked': the kernel of a sliding-window layer on `device_type`, in the
    dtype training uses there (bf16 autocast on CUDA, fp32 elsewhere)."""
    cuda = device_type == "cuda"
    return _kernel(cuda, torch.bfloat16 if cuda else torch.float32)


_KERNEL_NAMES = {"flex": "FlexAttention", "banded": "banded SDPA", "masked": "dense masked SDPA"}


def attention_path(window_sizes: list[tuple[int, int]], seq_len: int, device_type: str) -> str:
    """One line saying which kernel each kind of layer runs, for a model's per-layer `window_sizes`
    (`raychat.model.window_sizes`) at training length `seq_len` on `device_type`. For example
    "FlexAttention (sliding windows), SDPA causal (full)" on a GPU without FA3.

    Where sliding windows would run as dense masked SDPA (only when forced), the line ends with the
    warning the reference prints for its fallback.
    """
    n_sliding = sum(0 <= left < seq_len - 1 for left, _ in window_sizes)
    kernel = current_attention_impl(device_type)
    if kernel == "fa3":
        line = "FA3"
    else:
        kinds = [f"{_KERNEL_NAMES[kernel]} (sliding windows)"] if n_sliding else []
        if n_sliding < len(window_sizes):
            kinds.append("SDPA causal (full)")
        line = ", ".join(kinds)
    if _override_impl is not None:
        line += f" [forced: {_override_impl}]"
    if n_sliding and kernel == "masked":
        line += (" | WARNING: sliding-window layers attend over the whole T x T square through a mask, all the "
                 "work of full attention on a slower kernel, so they cost more than full-context layers; "
                 "unforce 'masked' or train with --window-pattern L")
    return line


def _band_mask(q_start: int, n_q: int, n_k: int, window: int, device: torch.device) -> torch.Tensor:
    """(n_q, n_k) boolean mask, True where query position q_start + i may attend key position j."""
    q_pos = torch.arange(q_start, q_start + n_q, device=device).unsqueeze(1)
    k_pos = torch.arange(n_k, device=device).unsqueeze(0)
    return (k_pos <= q_pos) & (q_pos - k_pos <= window)


def _banded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding-window SDPA computed over the band only: each block of queries attends only the keys from
    window before its first query to its last one, through a small mask. About Tq x (window + block)
    scores instead of Tq x Tk.

    (B, H, T, D) tensors, the Tq queries aligned with the last Tq keys. When they start the sequence
    (Tq == Tk), the first window + 1 queries see every key before them: one square for SDPA's causal
    kernel. Neighbouring blocks' key ranges overlap; k and v are split once at every range boundary and
    each range is a cat of its pieces, because slicing k per block would cost a zero-filled gradient the
    size of k per block in the backward pass.
    """
    Tq, Tk = q.size(2), k.size(2)
    block = BAND_BLOCK  # read per call, so that tests can shrink it
    offset = Tk - Tq  # position of the first query
    enable_gqa = q.size(1) != k.size(1)
    spans = []  # (first query, end query) as indices into q, (first key, end key) as positions
    first = 0
    if offset == 0:
        first = min(Tq, window + 1)
        spans.append((0, first, 0, first))
    for i0 in range(first, Tq, block):
        i1 = min(i0 + block, Tq)
        spans.append((i0, i1, max(0, offset + i0 - window), offset + i1))

    bounds = sorted({0, Tk}.union(*((k0, k1) for _, _, k0, k1 in spans)))
    piece_at = {b: i for i, b in enumerate(bounds)}
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    k_pieces, v_pieces = k.split(sizes, dim=2), v.split(sizes, dim=2)

    def key_range(pieces, k0, k1):
        a, b = piece_at[k0], piece_at[k1]
        return pieces[a] if b == a + 1 else torch.cat(pieces[a:b], dim=2)

    masks = {}  # full blocks share one mask
    outs = []
    for qb, (i0, i1, k0, k1) in zip(q.split([i1 - i0 for i0, i1, _, _ in spans], dim=2), spans):
        kb, vb = key_range(k_pieces, k0, k1), key_range(v_pieces, k0, k1)
        if offset == 0 and i0 == 0:
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=enable_gqa))
            continue
        shape = (offset + i0 - k0, i1 - i0, k1 - k0)
        if shape not in masks:
            masks[shape] = _band_mask(*shape, window, q.device)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=masks[shape], enable_gqa=enable_gqa))
    # Joined in the (B, T, H, D) layout the callers return, so that no copy follows.
    return torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)


def _sliding_block_mask(T: int, window: int, device: torch.device):
    """FlexAttention's block mask for a causal window: blocks wholly outside the band are never computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(in_window, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


_cached_block_mask = functools.lru_cache(maxsize=64)(_sliding_block_mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def _flex_sliding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                  compiled: bool = True) -> torch.Tensor:
    """Sliding-window attention through FlexAttention on (B, H, T, D) tensors, Tq == Tk.

    Eager FlexAttention materialises the scores; its fast kernel comes from torch.compile. Inside a compiled
    model, the model's compile makes that kernel and builds the block mask in its graph (cache lookups do
    not trace). `compiled=False` runs eagerly: forward only, for the CPU test of the mask.
    """
    from torch.nn.attention.flex_attention import flex_attention
    T = q.size(2)
    if torch.compiler.is_compiling():
        block_mask, flex = _sliding_block_mask(T, window, q.device), flex_attention
    else:
        block_mask = _cached_block_mask(T, window, q.device)
        flex = _compiled_flex() if compiled else flex_attention
    # One dtype for all three and autocast off inside: compiling FlexAttention's backward under autocast
    # with mixed input dtypes is a known failure (pytorch/pytorch#176025).
    k, v = k.to(q.dtype), v.to(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        return flex(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, kernel: str) -> torch.Tensor:
    """Causal attention without FA3 on (B, H, T, D) tensors, the Tq queries aligned with the last Tq keys.

    A window that covers every key takes SDPA's causal kernel (is_causal aligns the square's top-left
    corner, so only when Tq == Tk); a single decoding query just drops the keys outside its window; the
    rest (sliding windows in training, chunked prefill into a cache) goes to `kernel`: 'flex' (Tq == Tk
    only), 'banded' or 'masked'.
    """
    Tq, Tk = q.size(2), k.size(2)
    enable_gqa = q.size(1) != k.size(1)
    if window < 0 or window >= Tk - 1:
        window = Tk
    if window == Tk and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if Tq == 1:
        start = max(0, Tk - 1 - window)
        return F.scaled_dot_product_attention(q, k[:, :, start:], v[:, :, start:], enable_gqa=enable_gqa)
    if kernel == "flex" and Tq == Tk:
        return _flex_sliding(q, k, v, window)
    if kernel == "masked":
        mask = _band_mask(Tk - Tq, Tq, Tk, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    return _banded_sdpa(q, k, v, window)


def _check_causal(causal: bool, window_size: tuple[int, int]) -> None:
    if not causal:
        raise ValueError("causal=False is not supported: the SDPA fallback implements causal attention only")
    if len(window_size) != 2 or window_size[1] not in (0, -1):
        raise ValueError(f"window_size={window_size!r}: expected (left, 0) or (-1, -1); "
                         "a right-hand window makes no sense for causal attention")


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Training attention. q: (B, T, H, D); k, v: (B, T, Hkv, D) with H % Hkv == 0. Returns (B, T, H, D)."""
    kernel = _kernel(q.is_cuda, q.dtype)
    if kernel == "fa3":
        return _fa3.flash_attn_func(q, k, v, causal=causal, window_size=window_size)
    _check_causal(causal, window_size)
    y = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window_size[0], kernel)
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
    kernel = _kernel(q.is_cuda, q.dtype)
    if kernel == "fa3":
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
    # Banded, not FlexAttention: sampling would compile a kernel for every prompt length.
    kernel = "banded" if kernel == "flex" else kernel
    y = _sdpa(q.transpose(1, 2), k_cache[:, :end].transpose(1, 2), v_cache[:, :end].transpose(1, 2),
              window_size[0], kernel)
    return y.transpose(1, 2)
