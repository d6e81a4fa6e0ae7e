"""FP8 matmuls for training: the 2026-07 recipe's `--fp8` (nanochat 92d63d4 trains with it on H100-class GPUs).

A Linear does three matmuls per step: y = x·Wᵀ forward, then dx = dy·W and dW = dyᵀ·x backward. Under FP8 each
operand is scaled into the FP8 range, cast, and multiplied by `torch._scaled_mm`, which applies the inverse
scales and returns the result in the activations' dtype. Weights, optimizer state and every other op keep their
precision; only these three matmuls change.

- `tensorwise` (the reference's recipe, bit-for-bit its arithmetic): one scale per tensor,
  scale = 448 / max|t| (computed in float64, then float32), values clamped to ±max before the cast
  (the cast wraps, it does not saturate). x and W in e4m3, the incoming gradient in e5m2 (range over
  precision). The forward accumulates fast, the backward accurately. The FP8 copies of x and W are what
  backward reads.
- `rowwise` (raychat's; the reference accepts only tensorwise): one scale per row of each operand along the
  dimension it contracts over, rounded down to a power of two, e4m3 everywhere, accurate accumulation. A
  matmul contracts over different dimensions forward and backward, so backward quantizes x and W again, from
  the saved bf16 activations and the weight itself.

`to_fp8(model, recipe)` turns the model's eligible Linears into Float8Linear (before torch.compile: the same
parameters, so state dicts and optimizers do not change), and `fp8_disabled(model)` turns them back for the
duration of an evaluation, which the reference runs in bf16. Nothing here knows of Ray.
"""
from contextlib import contextmanager

import torch

from raychat.model import Linear

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EPS = 1e-12  # an all-zero tensor gets a finite scale


def quantize(t: torch.Tensor, dtype: torch.dtype, dim: int | None = None, pow2: bool = False):
    """(t in `dtype`, the float32 inverse scale _scaled_mm multiplies by). dim None: one scale for the tensor;
    else one per slice along `dim` (kept as a size-1 dimension)."""
    top = torch.finfo(dtype).max
    amax = t.float().abs().amax() if dim is None else t.float().abs().amax(dim=dim, keepdim=True)
    # float64 for the division: compiled and eager code then agree on the scale
    scale = (top / amax.double().clamp(min=EPS)).float()
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column: _scaled_mm's second operand must be laid out so."""
    return t.t().contiguous().t()


@torch._dynamo.allow_in_graph  # one opaque node for torch.compile, as the reference's
class TensorwiseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x (M, K), w (N, K) -> (M, N)
        xq, x_inv = quantize(x, E4M3)
        wq, w_inv = quantize(w, E4M3)
        ctx.save_for_backward(xq, x_inv, wq, w_inv)
        # wq is (N, K) row-major, so wq.t() is already the column-major (K, N) operand
        return torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        dyq, dy_inv = quantize(dy, E5M2)
        dx = torch._scaled_mm(dyq, col_major(wq), scale_a=dy_inv, scale_b=w_inv, out_dtype=dy.dtype,
                              use_fast_accum=False)
        dw = torch._scaled_mm(dyq.t().contiguous(), col_major(xq), scale_a=dy_inv, scale_b=x_inv,
                              out_dtype=dy.dtype, use_fast_accum=False)
        return dx, dw


@torch._dynamo.allow_in_graph
class RowwiseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xq, x_inv = quantize(x, E4M3, dim=1, pow2=True)   # (M, 1): contracts over K
        wq, w_inv = quantize(w, E4M3, dim=1, pow2=True)   # (N, 1)
        ctx.save_for_backward(x, w)
        return torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv.reshape(1, -1),
                                out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        # dx (M, K) = dy (M, N) · w (N, K): both contract over N
        dyq, dy_inv = quantize(dy, E4M3, dim=1, pow2=True)  # (M, 1)
        wq, w_inv = quantize(w, E4M3, dim=0, pow2=True)     # (1, K)
        dx = torch._scaled_mm(dyq, col_major(wq), scale_a=dy_inv, scale_b=w_inv, out_dtype=dy.dtype)
        # dw (N, K) = dyᵀ (N, M) · x (M, K): both contract over M
        dyq, dy_inv = quantize(dy, E4M3, dim=0, pow2=True)  # (1, N)
        xq, x_inv = quantize(x, E4M3, dim=0, pow2=True)     # (1, K)
        dw = torch._scaled_mm(dyq.t().contiguous(), col_major(xq), scale_a=dy_inv.reshape(-1, 1), scale_b=x_inv,
                              out_dtype=dy.dtype)
        return dx, dw


MATMUL = {"tensorwise": TensorwiseMatmul, "rowwise": RowwiseMatmul}
RECIPES = tuple(MATMUL)  # --fp8-recipe's choices


class Float8Linear(Linear):
    """A raychat Linear (no bias) whose matmul runs in FP8 by `fp8_recipe`; the weight is quantized from its
    fp32 master copy, the input arrives in the compute dtype."""
    fp8_recipe = "tensorwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = MATMUL[self.fp8_recipe].apply(x.reshape(-1, x.size(-1)), self.weight)
        return y.reshape(*x.shape[:-1], y.size(-1))


def check_device(device: torch.device) -> None:
    """Refuse, naming the device, where FP8 matmuls do not run on the GPU: before any data or model work."""
    if device.type != "cuda":
        raise ValueError(f"--fp8: FP8 matmuls need a CUDA GPU; this worker's device is {device.type}. "
                         "Leave --fp8 off here.")
    if torch.cuda.get_device_capability(device) < (8, 9):
        name, cap = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        raise ValueError(f"--fp8: FP8 matmuls need compute capability 8.9 or higher (H100, L4, ...); {name} has "
                         f"{cap[0]}.{cap[1]}. Leave --fp8 off on this GPU.")


def eligible(linear: torch.nn.Linear) -> bool:
    """The reference's filter: FP8 GEMMs need both sizes divisible by 16, and a matmul under 128 wide gains
    nothing (the value-embedding and smear gates stay as they are)."""
    n, k = linear.out_features, linear.in_features
    return n % 16 == 0 and k % 16 == 0 and min(n, k) >= 128


def to_fp8(model: torch.nn.Module, recipe: str) -> tuple[int, int]:
    """Make every eligible Linear of `model` a Float8Linear in place. Returns (converted, Linears in all)."""
    if recipe not in RECIPES:
        raise ValueError(f"FP8 recipe {recipe!r}: must be one of {', '.join(RECIPES)}")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for m in linears:
        if eligible(m):
            assert m.bias is None, "raychat's Linears have no bias"
            m.__class__ = Float8Linear
            m.fp8_recipe = recipe
    return sum(isinstance(m, Float8Linear) for m in linears), len(linears)


@contextmanager
def fp8_disabled(model: torch.nn.Module):
    """Plain Linears (bf16 matmuls) inside the block, FP8 again after it; a no-op for a model without FP8."""
    swapped = [m for m in model.modules() if isinstance(m, Float8Linear)]
    for m in swapped:
        m.__class__ = Linear
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = Float8Linear
