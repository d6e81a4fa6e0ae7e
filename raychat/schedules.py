"""The reference's schedules, as functions of the 0-based step being trained (docs/REFERENCE.md)."""


def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    # Python's round (half to even), as the reference: round(0.5 * 8715) == 4358.
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown  # the last trained step gets 1/warmdown, never 0
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(it: int) -> float:
    """0.85 -> 0.95 linearly over the first 300 steps, then constant."""
    frac = min(it / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def muon_weight_decay(it: int, num_iterations: int, weight_decay_scaled: float) -> float:
    """Linear decay to zero over the run."""
    return weight_decay_scaled * (1 - it / num_iterations)


def apply_schedules(optimizer, it: int, num_iterations: int, cfg, weight_decay_scaled: float) -> float:
    """Set every param group's lr (and Muon's momentum and weight decay) for step `it`; returns the lr
    multiplier, which the step line prints."""
    lrm = lr_multiplier(it, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(it)
            group["weight_decay"] = muon_weight_decay(it, num_iterations, weight_decay_scaled)
    return lrm
