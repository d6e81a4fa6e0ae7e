"""The schedules of each recipe, as functions of the 0-based step being trained (docs/REFERENCE.md)."""
import math


def lr_multiplier(it: int, num_iterations: int, warmup_iters: int, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warmup over `warmup_iters` steps, constant, then linear warmdown to final_lr_frac."""
    # Python's round (half to even), as the reference: round(0.5 * 8715) == 4358.
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown  # the last trained step gets 1/warmdown, never 0
    return progress * 1.0 + (1 - progress) * final_lr_frac


def warmup_iters(cfg, num_iterations: int) -> int:
    """--warmup-steps, or (when it is -1) --warmup-ratio of the run."""
    return cfg.warmup_steps if cfg.warmup_steps >= 0 else round(cfg.warmup_ratio * num_iterations)


def muon_momentum(it: int, num_iterations: int = 0, warmdown_ratio: float = 0.0, recipe: str = "seed") -> float:
    """seed: 0.85 -> 0.95 linearly over the first 300 steps, then constant.
    2026-07: 0.85 -> 0.97 over the first 400 steps, then 0.97, then down to 0.90 over the LR warmdown."""
    if recipe == "seed":
        frac = min(it / 300, 1)
        return (1 - frac) * 0.85 + frac * 0.95
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if it < 400:
        return (1 - it / 400) * 0.85 + it / 400 * 0.97
    if it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def muon_weight_decay(it: int, num_iterations: int, weight_decay_scaled: float, recipe: str = "seed") -> float:
    """seed: linear decay to zero over the run; 2026-07: cosine decay to zero."""
    if recipe == "seed":
        return weight_decay_scaled * (1 - it / num_iterations)
    return weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


def apply_schedules(optimizer, it: int, num_iterations: int, cfg, weight_decay_scaled: float) -> float:
    """Set every param group's lr (and Muon's momentum and weight decay) for step `it`; returns the lr
    multiplier, which the step line prints."""
    lrm = lr_multiplier(it, num_iterations, warmup_iters(cfg, num_iterations), cfg.warmdown_ratio,
                        cfg.final_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(it, num_iterations, cfg.warmdown_ratio, cfg.recipe)
            group["weight_decay"] = muon_weight_decay(it, num_iterations, weight_decay_scaled, cfg.recipe)
    return lrm
