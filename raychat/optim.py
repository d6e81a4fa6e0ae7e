"""Muon + AdamW in one optimizer, single-process (`MuonAdamW`) and ZeRO-2 sharded (`DistMuonAdamW`).

Each param group carries `kind`:
  adamw: {kind, params, lr, betas, eps, weight_decay}
  muon:  {kind, params, lr, momentum, ns_steps, beta2, weight_decay}; every param 2-D, one shape per group
Groups may carry extra keys (the training loop adds `initial_lr`); they are kept and saved untouched.

The maths lives once, in two kernels (`adamw_kernel_`, `muon_kernel_`) that both classes call; the classes
differ only in where the gradients come from (local `.grad`, or an averaged shard) and where the results go.
nanochat writes the step twice, once per class; here it exists once.

Hyperparameters reach the kernels as 0-d fp32 CPU tensors, so changing lr/momentum/wd every step does
not recompile them. The kernels are `torch.compile(dynamic=False, fullgraph=True)` like the reference where
the caller asks (`compile_kernels`; the training loop's --compile) and by default on CUDA (COMPILE_KERNELS).

Precision. The reference runs Polar Express in bf16 inside its compiled kernel (inductor keeps the fused
intermediates in fp32) and then casts beta2, lr and wd to the result's dtype (bf16(0.95) = 0.94921875).
`ortho_dtype=None` reproduces that where the kernels are compiled and bf16 matmuls are native (CUDA; CPUs with
avx512_bf16, AMX-bf16, ARM bf16: `cpu_has_native_bf16`). Eager kernels run in fp32 with exact beta2/lr/wd:
eager bf16 rounds every intermediate and lands further from the reference's trajectory than fp32 does
(tests/test_cuda.py measures it); where bf16 is emulated it is also many times slower (`default_ortho_dtype`).

Recipes (`recipe=`, RECIPES). "seed" is the arithmetic above (nanochat 07c4dd4). "2026-07" is nanochat
92d63d4's: Muon equilibrates the rows of the momentum before Polar Express (MuonEq), normalises with a slack of
1.01, casts the result back to the param dtype, and rescales it to the Frobenius norm of an exactly
semi-orthogonal matrix, sqrt(min(rows, cols)) (Muon+), before variance reduction; beta2/lr/wd are then in the
param dtype (fp32), not bf16. AdamW widens bf16 params and state to fp32 for its arithmetic and rounds once.
That reference orthogonalises in bf16 exactly when its model computes in bf16, else in the gradient's dtype
(fp32): `ortho_dtype` is that dtype, and a caller that knows its compute dtype passes it (torch.bfloat16 or
torch.float32); None falls back to the reference's default compute dtype, bf16 on CUDA (compiled kernels, as
above) and fp32 elsewhere.
"""
import functools
import math

import torch
import torch.distributed as dist
from torch import Tensor

# Whether the kernels compile when the optimizer is not told (compile_kernels=None): on CUDA as the reference;
# on CPU only when asked (the loop's --compile), because a cold inductor compile of the two kernels costs
# ~50 s on a 2-core CPU, which a small or short CPU run (the tests) never wins back. Flip to False to debug.
COMPILE_KERNELS = {"cuda": True, "cpu": False}

# Polar Express coefficients (a, b, c), one triple per iteration, in order (arXiv 2505.16932,
# num_iters = 5, safety_factor = 2e-2, cushion = 2).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# The Frobenius normalisation divides by ||X|| * 1.02 + 1e-6: the slack keeps the top singular value
# safely inside the polynomials' convergence region even after bf16 rounding.
NORM_SLACK, NORM_EPS = 1.02, 1e-6
# The 2026-07 recipe equilibrates rows first (a better-conditioned input) and leaves less slack.
NORM_SLACK_2026_07 = 1.01

# The arithmetic variants the optimizer implements (the module docstring says what each does).
RECIPES = ("seed", "2026-07")

# AdamW params with fewer elements than this are all-reduced and updated whole on every rank; larger ones
# are reduce-scattered along dim 0 and their state sharded.
SMALL_PARAM_NUMEL = 1024

# torch 2.13 calls these collectives *_single and deprecates the older names, which are all that older torch
# has (the GPU images this project is checked on may carry one).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)

_GROUP_KEYS = {
    "adamw": ("lr", "betas", "eps", "weight_decay"),
    "muon": ("lr", "momentum", "ns_steps", "beta2", "weight_decay"),
}


# ------------------------------------------------------------------------------------------------------
# The maths. Pure functions of tensors; the hyperparameters are 0-d fp32 CPU tensors.

def adamw_kernel_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                  beta1: Tensor, beta2: Tensor, eps: Tensor, wd: Tensor) -> None:
    """One AdamW update of `p` in place: decoupled decay, then bias-corrected Adam.

    The arithmetic runs in p's dtype: 0-d hyperparameter tensors do not promote (bf16 for wte/VE on CUDA).
    """
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    denom = (exp_avg_sq / bias2).sqrt() + eps
    p.sub_((lr / bias1) * exp_avg / denom)


def adamw_fp32_kernel_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                       beta1: Tensor, beta2: Tensor, eps: Tensor, wd: Tensor) -> None:
    """The 2026-07 recipe's AdamW: `adamw_kernel_`'s update with the arithmetic in fp32 whatever p's dtype. bf16
    params and their state are widened, updated and rounded back once, rather than rounding every intermediate
    to bf16's 8 bits (a second moment's 0.5% step is below its resolution); for fp32 tensors `.float()` is the
    tensor itself. The last step is rounded as nanochat 92d63d4 rounds it (exp_avg / denom first, then scaled),
    so that the eager kernel reproduces its steps bit for bit."""
    p32, m, v = p.float(), exp_avg.float(), exp_avg_sq.float()
    g = grad.float()
    p32.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.lerp_(g.square(), 1 - beta2)
    denom = (v / (1 - beta2 ** step)).sqrt() + eps
    p32.add_(m / denom, alpha=-(lr / (1 - beta1 ** step)))
    for t, t32 in zip((p, exp_avg, exp_avg_sq), (p32, m, v)):
        if t.dtype != torch.float32:
            t.copy_(t32)


def equilibrate_rows(x: Tensor) -> Tensor:
    """Each matrix of the stack x with every row rescaled to the matrix's root-mean-square row norm (MuonEq,
    arXiv 2603.28254): same Frobenius norm, better-conditioned spectrum for the polar iteration. The norms are
    taken in fp32; x keeps its dtype."""
    x32 = x.float()
    rms_row = x32.norm(dim=(-2, -1), keepdim=True) / math.sqrt(x.size(-2))
    return x * (rms_row / x32.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(x.dtype)


def polar_express(u: Tensor, ns_steps: int, dtype: torch.dtype, slack: float = NORM_SLACK) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix of the stack `u` (..., rows, cols) in `dtype`.

    Contract: the singular values of the result lie in roughly [0.7, 1.2] whatever u's spectrum (the
    "Polar Express band"); singular vectors are u's. Tall matrices iterate on the small Gram XᵀX, wide and
    square ones on XXᵀ, so the cost is in the smaller dimension.
    """
    x = u.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * slack + NORM_EPS)
    tall = u.size(-2) > u.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def muon_kernel_(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum_buffer: Tensor,
                 momentum: Tensor, lr: Tensor, wd: Tensor, beta2: Tensor, ns_steps: int,
                 ortho_dtype: torch.dtype, recipe: str = "seed") -> None:
    """One Muon update of the stacked `params` (K, rows, cols) in place. `grads` is a scratch stack
    (overwritten); the two buffers are this stack's state, (K, rows, cols) and (K, rows, 1) or (K, 1, cols).

    `lr` is already the effective lr (group lr × sqrt(max(1, rows/cols))). `recipe` picks step 2 (RECIPES).
    """
    # 1. Nesterov momentum by lerp: buf ← lerp(buf, g, 1-μ); u = lerp(g, buf, μ) = (1-μ)g + μ·buf.
    mu = momentum.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - mu)
    u = grads.lerp_(momentum_buffer, mu)
    if recipe == "seed":
        # 2. Orthogonalise. g stays in ortho_dtype from here on, and so do beta2/lr/wd (the reference's quirk, kept).
        g = polar_express(u, ns_steps, ortho_dtype)
    else:
        # 2. (2026-07) Equilibrate rows, orthogonalise, back to the param dtype; then set the Frobenius norm to
        # sqrt(min(rows, cols)), an exact semi-orthogonal matrix's, undoing the iteration's under-convergence (Muon+).
        g = polar_express(equilibrate_rows(u.to(ortho_dtype)), ns_steps, ortho_dtype, NORM_SLACK_2026_07)
        g = g.to(params.dtype)
        norm = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        g = g * (math.sqrt(min(g.size(-2), g.size(-1))) / norm).to(g.dtype)
    beta2, lr, wd = beta2.to(g.dtype), lr.to(g.dtype), wd.to(g.dtype)
    # 3. NorMuon variance reduction: per-row (tall/square) or per-column (wide) running mean of g², no bias
    # correction; rescale rows/columns by its inverse RMS, then restore each matrix's Frobenius norm.
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    n = g.size(red_dim)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * n * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    if recipe == "seed":
        scale = step_size * v_norm / v_norm_new.clamp_min(1e-10)
    else:  # the ratio first, as nanochat 92d63d4 rounds it (eager kernels then reproduce its steps bit for bit)
        scale = step_size * (v_norm / v_norm_new.clamp_min(1e-10))
    g = g * scale.to(g.dtype)
    # 4. Cautious weight decay: decay only where the update and the weight agree in sign (or one is 0).
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


def default_ortho_dtype(device: torch.device | str, compiled: bool | None = None,
                        recipe: str = "seed") -> torch.dtype:
    """The Polar Express dtype `ortho_dtype=None` picks: the reference's bf16 where its arithmetic can be had,
    i.e. the kernels are compiled (`compiled`; None: as COMPILE_KERNELS) and bf16 matmuls are native (CUDA; CPUs
    with `cpu_has_native_bf16()`; for the 2026-07 recipe CUDA only, since that reference computes, and so
    orthogonalises, in fp32 on a CPU); fp32 elsewhere.

    Eager bf16 is neither the reference's arithmetic nor close to it: against the reference's trajectory it
    drifts further than eager fp32 does; and where bf16 is emulated it costs most of a step. Pass `ortho_dtype`
    to force one.
    """
    kind = torch.device(device).type
    compiled = COMPILE_KERNELS.get(kind, False) if compiled is None else compiled
    native = kind == "cuda" or (kind == "cpu" and recipe == "seed" and cpu_has_native_bf16())
    return torch.bfloat16 if native and compiled else torch.float32


def _cpu_flags() -> set[str]:
    """The CPU feature flags /proc/cpuinfo lists (x86 `flags`, ARM `Features`); empty where it is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware: x86 avx512_bf16 or AMX-bf16, ARM bf16 (oneDNN's fast
    paths). torch's own `mkldnn._is_mkldnn_bf16_supported()` is also true on plain AVX512 (avx512bw), where
    oneDNN emulates bf16 dot products, so it is not the test. macOS (no /proc/cpuinfo) answers False."""
    flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def _kernels(device_type: str, compiled: bool | None = None, recipe: str = "seed"):
    """(adamw, muon) kernels for a device type and recipe: compiled if `compiled` (None: as COMPILE_KERNELS), else
    eager. The muon kernel takes the recipe as its last argument."""
    adamw = adamw_kernel_ if recipe == "seed" else adamw_fp32_kernel_
    if compiled if compiled is not None else COMPILE_KERNELS.get(device_type, False):
        compile_ = functools.partial(torch.compile, dynamic=False, fullgraph=True)
        return compile_(adamw), compile_(muon_kernel_)
    return adamw, muon_kernel_


# ------------------------------------------------------------------------------------------------------
# Single process

class MuonAdamW(torch.optim.Optimizer):
    """Muon for the transformer matrices, AdamW for the rest, on one process.

    `ortho_dtype`: dtype of the Polar Express iteration. None picks with `default_ortho_dtype` (bf16, the
    reference's behaviour, where the kernels are compiled and bf16 matmuls are native; fp32 otherwise); torch.bfloat16 or
    torch.float32 forces one. `compile_kernels`: torch.compile the two kernels (None: as COMPILE_KERNELS).
    `recipe`: "seed" or "2026-07", the arithmetic of both updates (module docstring); the state is the same.
    Muon state lives on each group's first param: momentum_buffer (K, rows, cols) in the param dtype and
    second_momentum_buffer (K, rows, 1) if rows >= cols else (K, 1, cols) in fp32. AdamW state per param:
    step (int), exp_avg, exp_avg_sq in the param dtype, created on the first step that has a gradient.
    """

    def __init__(self, param_groups, ortho_dtype: torch.dtype | None = None, compile_kernels: bool | None = None,
                 recipe: str = "seed"):
        super().__init__(param_groups, defaults={})
        if ortho_dtype not in (None, torch.bfloat16, torch.float32):
            raise ValueError(f"ortho_dtype={ortho_dtype} is not supported: pass None (per device, see "
                             "default_ortho_dtype), torch.bfloat16 or torch.float32")
        if recipe not in RECIPES:
            raise ValueError(f"recipe={recipe!r} is unknown: the optimizer implements {list(RECIPES)}")
        self.ortho_dtype = ortho_dtype
        self.compile_kernels = compile_kernels
        self.recipe = recipe
        for group in self.param_groups:
            _validate_group(group)
        # 0-d fp32 CPU hyperparameter tensors, refilled each step: changing values never recompile.
        self._hp = {name: torch.tensor(0.0, dtype=torch.float32)
                    for name in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_hp"):  # during __init__ the groups are validated together afterwards
            _validate_group(self.param_groups[-1])

    # -- shared helpers (used by DistMuonAdamW too) --

    def ortho_dtype_for(self, device: torch.device) -> torch.dtype:
        """The Polar Express dtype of parameters on `device`: the one asked for, else per device and kernels."""
        if self.ortho_dtype is not None:
            return self.ortho_dtype
        return default_ortho_dtype(device, self.compile_kernels, self.recipe)

    def _adamw_update(self, group: dict, p: Tensor, grad: Tensor, state: dict, p_view: Tensor) -> None:
        """AdamW on `p_view` (p itself, or this rank's dim-0 slice of it) with state held in `state`."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_view)
            state["exp_avg_sq"] = torch.zeros_like(p_view)
        state["step"] += 1
        hp = self._hp
        hp["step"].fill_(state["step"])
        hp["lr"].fill_(group["lr"])
        hp["beta1"].fill_(group["betas"][0])
        hp["beta2"].fill_(group["betas"][1])
        hp["eps"].fill_(group["eps"])
        hp["wd"].fill_(group["weight_decay"])
        adamw, _ = _kernels(p.device.type, self.compile_kernels, self.recipe)
        adamw(p_view, grad, state["exp_avg"], state["exp_avg_sq"], hp["step"], hp["lr"], hp["beta1"],
              hp["beta2"], hp["eps"], hp["wd"])

    def _muon_update(self, group: dict, grads: Tensor, params: Tensor, state: dict, n_state: int) -> None:
        """Muon on the stacked `params` (k, rows, cols) with `grads` (overwritten). `state` is the group's
        first param's state, sized for `n_state` >= k matrices (the leading k are used)."""
        k, rows, cols = params.shape
        if not state:
            shape1, shape2 = _muon_state_shapes(rows, cols, n_state)
            state["momentum_buffer"] = torch.zeros(shape1, dtype=params.dtype, device=params.device)
            state["second_momentum_buffer"] = torch.zeros(shape2, dtype=torch.float32, device=params.device)
        if k == 0:
            return
        hp = self._hp
        hp["momentum"].fill_(group["momentum"])
        hp["lr"].fill_(group["lr"] * math.sqrt(max(1.0, rows / cols)))  # tall matrices get a larger step
        hp["wd"].fill_(group["weight_decay"])
        hp["beta2"].fill_(group["beta2"])
        _, muon = _kernels(params.device.type, self.compile_kernels, self.recipe)
        muon(grads, params, state["momentum_buffer"][:k], state["second_momentum_buffer"][:k],
             hp["momentum"], hp["lr"], hp["wd"], hp["beta2"], group["ns_steps"],
             self.ortho_dtype_for(params.device), self.recipe)

    # -- the step --

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every group, in group order. AdamW params without a gradient are skipped; a Muon
        group must have gradients for all of its params or for none."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "adamw":
                for p in params:
                    if p.grad is not None:
                        self._adamw_update(group, p, p.grad, self.state[p], p)
                continue
            missing = [i for i, p in enumerate(params) if p.grad is None]
            if len(missing) == len(params):
                continue
            if missing:
                raise RuntimeError(f"Muon group of shape {tuple(params[0].shape)}: params {missing} have no "
                                   "gradient while others do; Muon stacks the whole group, so every param "
                                   "must take part in the loss (or none)")
            stacked = torch.stack(params)
            self._muon_update(group, torch.stack([p.grad for p in params]), stacked, self.state[params[0]],
                              len(params))
            torch._foreach_copy_(params, list(stacked.unbind(0)))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Standard Optimizer loading, then a check that every state tensor has the shape this optimizer
        (its groups, and for DistMuonAdamW its world size) expects: a shard from another layout is refused
        rather than silently mis-sliced. A checkpoint of another world size is laid out for this one by its
        loader (raychat.checkpoint.load_rank_state, with `reshard` below)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p, key, shape in self._expected_state_shapes(group):
                got = self.state[p].get(key) if p in self.state else None
                if got is not None and tuple(got.shape) != shape:
                    raise ValueError(
                        f"optimizer state '{key}' for a {group['kind']} param of shape {tuple(p.shape)} has "
                        f"shape {tuple(got.shape)}, expected {shape}: a state dict is only valid for the same "
                        f"param groups and world size ({self._world_size}); load the shard this rank saved "
                        "in a run with the same layout")

    _rank, _world_size = 0, 1

    def param_shapes(self) -> list[tuple]:
        """The shape of every param in state-dict index order (groups in order, params in order)."""
        return [tuple(p.shape) for group in self.param_groups for p in group["params"]]

    def _expected_state_shapes(self, group: dict) -> list[tuple[Tensor, str, tuple]]:
        """(param, state key, shape) of every state tensor of a group, single-process layout."""
        params = group["params"]
        if group["kind"] == "adamw":
            return [(p, key, tuple(p.shape)) for p in params for key in ("exp_avg", "exp_avg_sq")]
        return _muon_state_entries(params[0], len(params))


def _muon_state_shapes(rows: int, cols: int, n_state: int) -> tuple[tuple, tuple]:
    """Shapes of momentum_buffer and second_momentum_buffer for n_state stacked (rows, cols) matrices: the
    second moment is factored, one statistic per row (rows >= cols) or per column (wide)."""
    return (n_state, rows, cols), ((n_state, rows, 1) if rows >= cols else (n_state, 1, cols))


def _muon_state_entries(first: Tensor, n_state: int) -> list[tuple[Tensor, str, tuple]]:
    shape1, shape2 = _muon_state_shapes(*first.shape, n_state)
    return [(first, "momentum_buffer", shape1), (first, "second_momentum_buffer", shape2)]


def _validate_group(group: dict) -> None:
    """Raise ValueError naming the problem if a group's kind, keys or Muon shapes are not usable."""
    kind = group.get("kind")
    if kind not in _GROUP_KEYS:
        raise ValueError(f"param group kind={kind!r} is unknown: every group needs kind 'adamw' or 'muon'")
    missing = [k for k in _GROUP_KEYS[kind] if k not in group]
    if missing:
        raise ValueError(f"{kind} param group is missing {missing}; an {kind} group needs "
                         f"{list(_GROUP_KEYS[kind])}")
    if kind == "muon":
        shapes = {tuple(p.shape) for p in group["params"]}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"Muon group has param shapes {sorted(shapes)}: a Muon group must hold 2-D params "
                             "of a single shape (build one group per shape)")
        if not 1 <= group["ns_steps"] <= len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"Muon ns_steps={group['ns_steps']} must be in 1..{len(POLAR_EXPRESS_COEFFS)} "
                             "(one Polar Express coefficient triple per step)")


# ------------------------------------------------------------------------------------------------------
# Distributed (ZeRO-2)

class DistMuonAdamW(MuonAdamW):
    """MuonAdamW over the default process group with ZeRO-2 sharding. No DDP wrapper: the
    gradients are averaged here, inside step(), so every rank must call step() with its local gradients.

    - AdamW params with numel < 1024: all_reduce(AVG), full update with replicated state on every rank.
    - Larger AdamW params: reduce_scatter(AVG) along dim 0; rank r owns rows [r·per, (r+1)·per) ∩ [0, R)
      with per = ceil(R / W), updates them with state of that slice's shape, then all_gathers the param.
      When W does not divide R (an elastic run at an odd world size) the gradient and the gather are
      zero-padded to per·W rows; the update is elementwise, so the result is the same as unpadded.
    - Muon group of K params: chunk = ceil(K / W); rank r owns params [r·chunk, (r+1)·chunk) ∩ [0, K) and
      holds state of leading size chunk (a rank owning fewer uses the leading part).
    Every reduction is launched before any computation (phase 1), so communication overlaps the maths of
    the earlier groups (phase 2); the gathers are awaited last (phase 3).

    ReduceOp.AVG is used on every backend. (The reference targets NCCL only; gloo on torch 2.13 implements
    AVG for all_reduce and reduce_scatter, verified on this project's pinned version, so the CPU path needs
    no SUM-then-divide special case.) torch.distributed must already be initialised (Ray Train does it).
    A state dict is this rank's shard: valid only for the same world size and groups.
    """

    def __init__(self, param_groups, ortho_dtype: torch.dtype | None = None, compile_kernels: bool | None = None,
                 recipe: str = "seed"):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("DistMuonAdamW needs an initialised default process group "
                               "(torch.distributed.init_process_group); use MuonAdamW for one process")
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        super().__init__(param_groups, ortho_dtype, compile_kernels, recipe)

    def _expected_state_shapes(self, group: dict) -> list[tuple[Tensor, str, tuple]]:
        params = group["params"]
        if group["kind"] == "adamw":
            out = []
            for p in params:
                shape = tuple(p.shape)
                if p.numel() >= SMALL_PARAM_NUMEL:
                    shape = (_share(shape[0], self._rank, self._world_size)[2], *shape[1:])
                out += [(p, "exp_avg", shape), (p, "exp_avg_sq", shape)]
            return out
        return _muon_state_entries(params[0], -(-len(params) // self._world_size))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = self._rank, self._world_size
        avg = dist.ReduceOp.AVG

        # Phase 1: launch every reduction, group by group, in group order (identical on all ranks).
        launched = []
        for group in self.param_groups:
            params = group["params"]
            grads = [self._grad_of(p) for p in params]
            if group["kind"] == "adamw":
                for p, grad in zip(params, grads):
                    if p.numel() < SMALL_PARAM_NUMEL:
                        work = dist.all_reduce(grad, op=avg, async_op=True)
                        launched.append((work, group, p, grad))
                    else:
                        per = -(-p.shape[0] // world)
                        if per * world != p.shape[0]:  # uneven rows: zero-pad to per·W (see the docstring)
                            padded = grad.new_zeros((per * world, *p.shape[1:]))
                            padded[:p.shape[0]] = grad
                            grad = padded
                        grad_slice = grad.new_empty((per, *p.shape[1:]))
                        work = _reduce_scatter(grad_slice, grad, op=avg, async_op=True)
                        launched.append((work, group, p, grad_slice))
            else:
                k, (rows, cols) = len(params), params[0].shape
                chunk = -(-k // world)
                stacked = grads[0].new_zeros(chunk * world, rows, cols)  # zero-padded past K
                torch._foreach_copy_(list(stacked[:k].unbind(0)), grads)
                grad_chunk = grads[0].new_empty(chunk, rows, cols)
                work = _reduce_scatter(grad_chunk, stacked, op=avg, async_op=True)
                launched.append((work, group, stacked, grad_chunk))

        # Phase 2: wait for each reduction in order and update what this rank owns; launch the gathers.
        gathers = []
        for work, group, target, grad in launched:
            work.wait()
            if group["kind"] == "adamw":
                p = target
                if p.numel() < SMALL_PARAM_NUMEL:
                    self._adamw_update(group, p, grad, self.state[p], p)
                else:
                    per, start, n_own = _share(p.shape[0], rank, world)
                    p_slice = p[start:start + n_own]
                    self._adamw_update(group, p, grad[:n_own], self.state[p], p_slice)
                    if per * world == p.shape[0]:
                        gathers.append((_all_gather(p, p_slice, async_op=True), None, None, None))
                    else:  # gather equal chunks into a padded buffer; phase 3 copies the real rows out
                        chunk = p.new_zeros((per, *p.shape[1:]))
                        chunk[:n_own] = p_slice
                        gathered = p.new_empty((per * world, *p.shape[1:]))
                        gathers.append((_all_gather(gathered, chunk, async_op=True), "rows", [p], gathered))
            else:
                params, stacked, chunk = group["params"], target, grad.shape[0]
                start = rank * chunk
                n_own = max(0, min(chunk, len(params) - start))
                owned = grad.new_zeros(grad.shape)
                if n_own:  # _foreach_copy_ rejects empty lists; a rank may own nothing (K < W·chunk)
                    torch._foreach_copy_(list(owned[:n_own].unbind(0)), params[start:start + n_own])
                self._muon_update(group, grad[:n_own], owned[:n_own], self.state[params[0]], chunk)
                # The gradient stack is free again: gather the updated params into it.
                gathers.append((_all_gather(stacked, owned, async_op=True), "stack", params, stacked))

        # Phase 3: wait for the gathers and copy each Muon param (and padded AdamW param) out of its buffer.
        for work, kind, params, stacked in gathers:
            work.wait()
            if kind == "rows":  # a zero-padded AdamW param: its real rows
                params[0].copy_(stacked[:params[0].shape[0]])
            elif kind == "stack":
                torch._foreach_copy_(params, list(stacked[:len(params)].unbind(0)))
        return loss

    @staticmethod
    def _grad_of(p: Tensor) -> Tensor:
        if p.grad is None:
            raise RuntimeError(f"param of shape {tuple(p.shape)} has no gradient: DistMuonAdamW averages every "
                               "param's gradient across ranks, so all ranks need a gradient for every param "
                               "(make it take part in the loss, or leave it out of the optimizer)")
        return p.grad if p.grad.is_contiguous() else p.grad.contiguous()


# ------------------------------------------------------------------------------------------------------
# Resharding (elastic runs, docs/ARCHITECTURE.md): a state saved by W ranks continued on W' ranks.
#
# The full state is the single-process (MuonAdamW) layout, which is also DistMuonAdamW's at W = 1. Rank r of
# W holds: AdamW params below SMALL_PARAM_NUMEL whole (replicated); larger AdamW params rows
# [r·per, (r+1)·per) ∩ [0, R) of exp_avg / exp_avg_sq, per = ceil(R/W); for each Muon group of K params, on its first param, buffers of
# leading size chunk = ceil(K/W) whose first n_own = clamp(K - r·chunk, 0, chunk) entries are params
# [r·chunk, r·chunk + n_own) and whose rest stays zero (no rank ever writes it). Gathering and cutting are
# copies, so W -> W' -> W gives back the very tensors saved.

def _share(k: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(chunk, start, n_own) of k items (a Muon group's params, a large AdamW param's rows) on `rank` of
    `world_size`: chunks of ceil(k/W), the last ranks own fewer or none (DistMuonAdamW.step)."""
    chunk = -(-k // world_size)
    start = rank * chunk
    return chunk, start, max(0, min(chunk, k - start))


def _groups_of(state_dict: dict):
    return [(g["kind"], list(g["params"])) for g in state_dict["param_groups"]]


def gather_full_state(shards: list[dict], param_shapes: list[tuple]) -> dict:
    """The single-process state dict from the state dicts of all W = len(shards) ranks (rank order)."""
    world = len(shards)
    first = shards[0]
    if any(_groups_of(s) != _groups_of(first) for s in shards):
        raise ValueError("the optimizer shards disagree on their param groups: they are not from one run")
    state = {}
    for kind, idxs in _groups_of(first):
        present = [i for i in idxs if i in first["state"]]
        if kind == "adamw":
            for i in present:
                entry = dict(first["state"][i])  # step (an int) and, for small params, the whole state
                if math.prod(param_shapes[i]) >= SMALL_PARAM_NUMEL:
                    for key in ("exp_avg", "exp_avg_sq"):
                        parts = [s["state"][i][key] for s in shards]
                        rows = [_share(param_shapes[i][0], r, world)[2] for r in range(world)]
                        if [t.shape[0] for t in parts] != rows:
                            raise ValueError(f"AdamW state '{key}' of a param of shape {param_shapes[i]}: shards "
                                             f"of {[t.shape[0] for t in parts]} rows, expected {rows} from "
                                             f"{world} ranks")
                        entry[key] = torch.cat(parts, 0)
                state[i] = entry
        elif present:
            first_idx, k = idxs[0], len(idxs)
            entry = {}
            for key in ("momentum_buffer", "second_momentum_buffer"):
                parts = []
                for rank, s in enumerate(shards):
                    chunk, _, n_own = _share(k, rank, world)
                    t = s["state"][first_idx][key]
                    if t.shape[0] != chunk:
                        raise ValueError(f"Muon state '{key}' of a group of {k} params of shape "
                                         f"{param_shapes[first_idx]}: rank {rank} holds {t.shape[0]} matrices, "
                                         f"expected ceil({k}/{world}) = {chunk}")
                    parts.append(t[:n_own])
                entry[key] = torch.cat(parts, 0)
            state[first_idx] = entry
    return {"state": state, "param_groups": [dict(g) for g in first["param_groups"]]}


def shard_state(full: dict, param_shapes: list[tuple], rank: int, world_size: int) -> dict:
    """Rank `rank`'s state dict of a DistMuonAdamW over `world_size` ranks, cut from a full state dict."""
    state = {}
    for kind, idxs in _groups_of(full):
        present = [i for i in idxs if i in full["state"]]
        if kind == "adamw":
            for i in present:
                entry = dict(full["state"][i])
                if math.prod(param_shapes[i]) >= SMALL_PARAM_NUMEL:
                    _, start, n_own = _share(param_shapes[i][0], rank, world_size)
                    for key in ("exp_avg", "exp_avg_sq"):
                        entry[key] = full["state"][i][key][start:start + n_own].clone()
                else:
                    entry = {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
                state[i] = entry
        elif present:
            first_idx = idxs[0]
            chunk, start, n_own = _share(len(idxs), rank, world_size)
            entry = {}
            for key in ("momentum_buffer", "second_momentum_buffer"):
                t = full["state"][first_idx][key]
                out = t.new_zeros((chunk, *t.shape[1:]))
                out[:n_own] = t[start:start + n_own]
                entry[key] = out
            state[first_idx] = entry
    return {"state": state, "param_groups": [dict(g) for g in full["param_groups"]]}


def reshard(shards: list[dict], param_shapes: list[tuple], rank: int, world_size: int) -> dict:
    """Rank `rank` of `world_size`'s state dict from the state dicts of all ranks of another world size."""
    return shard_state(gather_full_state(shards, param_shapes), param_shapes, rank, world_size)
