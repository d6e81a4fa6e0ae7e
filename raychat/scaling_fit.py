"""The isoFLOP analysis of a scaling study, in plain numpy: per-budget minima, the two power laws, a recommendation.

The method is nanochat's (and Chinchilla's "approach 2"): for each FLOP budget C, val bpb is fitted by a
quadratic in log10 N (N = the scaling parameters: transformer matrices + lm_head); its vertex is the
compute-optimal size N_opt(C), and the tokens at that size D_opt(C) are interpolated from the budget's own runs
(not C / 6N: raychat's FLOPs per token include attention). Lines through (log C, log N_opt) and
(log C, log D_opt) give N_opt ~ C^a and D_opt ~ C^b with the ordinary least-squares standard errors.

A budget whose lowest val bpb sits at its smallest or largest depth did not bracket its optimum: it is
reported as such and left out of the laws, never extrapolated. Nothing here knows Ray or torch.
"""
import math
from dataclasses import dataclass, field

import numpy as np


class FitError(ValueError):
    """The points cannot support the fit; the message says what is missing."""


@dataclass
class Point:
    budget: float  # FLOPs
    depth: int
    n: float  # scaling parameters
    tokens: float
    val_bpb: float


@dataclass
class BudgetFit:
    budget: float
    points: list  # [Point], sorted by n
    coeffs: tuple | None  # (a, b, c) of val_bpb = a x^2 + b x + c, x = log10 n
    n_opt: float | None = None  # None: no minimum inside the depths (see `edge`)
    tokens_opt: float | None = None
    bpb_opt: float | None = None
    edge: str | None = None  # why there is no optimum here, or None

    @property
    def ratio_opt(self) -> float | None:
        return None if self.n_opt is None else self.tokens_opt / self.n_opt


@dataclass
class PowerLaw:
    """y = k * C^exponent, fitted as log10 y = exponent * log10 C + log10 k."""

    exponent: float
    exponent_se: float  # nan with two budgets: a line through two points has no residual to estimate it from
    log10_k: float
    log10_k_se: float

    def __call__(self, c: float) -> float:
        return 10 ** (self.log10_k + self.exponent * math.log10(c))


@dataclass
class ScalingFit:
    budgets: list  # [BudgetFit], by budget
    n_law: PowerLaw
    d_law: PowerLaw
    ratios: list = field(default_factory=list)  # tokens / params at each optimum

    def ratio_at(self, c: float) -> float:
        """The compute-optimal tokens:params ratio the two laws give at budget `c`."""
        return self.d_law(c) / self.n_law(c)

    @property
    def reference_budget(self) -> float:
        """The geometric mean of the fitted budgets: where the laws are best determined."""
        cs = [b.budget for b in self.budgets if b.n_opt is not None]
        return math.sqrt(min(cs) * max(cs))


def fit_budget(budget: float, points: list) -> BudgetFit:
    """The quadratic of val bpb against log10 N for one budget, and its minimum if the depths bracket it."""
    pts = sorted(points, key=lambda p: p.n)
    if len({p.n for p in pts}) < 3:
        raise FitError(f"budget {budget:.3g} FLOPs has {len(pts)} finished point(s) with "
                       f"{len({p.n for p in pts})} distinct model size(s); a quadratic needs at least 3")
    x = np.log10([p.n for p in pts])
    y = np.array([p.val_bpb for p in pts])
    a, b, c = np.polyfit(x, y, 2)
    fit = BudgetFit(budget=budget, points=pts, coeffs=(float(a), float(b), float(c)))
    best = int(np.argmin(y))
    if a <= 0:
        fit.edge = "no minimum: the fitted curve opens downward"
    elif best in (0, len(pts) - 1):
        side = "smallest" if best == 0 else "largest"
        fit.edge = f"lowest val bpb at the {side} depth (d{pts[best].depth}): the optimum lies outside the grid; " \
                   f"add {'smaller' if best == 0 else 'larger'} depths"
    else:
        x_opt = -b / (2 * a)
        if not x[0] <= x_opt <= x[-1]:
            fit.edge = "the fitted minimum lies outside the depths"
        else:
            fit.n_opt = float(10 ** x_opt)
            fit.bpb_opt = float(a * x_opt**2 + b * x_opt + c)
            fit.tokens_opt = float(10 ** np.interp(x_opt, x, np.log10([p.tokens for p in pts])))
    return fit


def fit_power_law(cs, ys) -> PowerLaw:
    """Least squares of log10 y on log10 C, with the standard errors of slope and intercept."""
    lx, ly = np.log10(np.asarray(cs, float)), np.log10(np.asarray(ys, float))
    n = len(lx)
    slope, intercept = np.polyfit(lx, ly, 1)
    if n <= 2:
        return PowerLaw(float(slope), float("nan"), float(intercept), float("nan"))
    resid = ly - (slope * lx + intercept)
    s2 = float(resid @ resid) / (n - 2)
    sxx = float(((lx - lx.mean()) ** 2).sum())
    return PowerLaw(float(slope), math.sqrt(s2 / sxx), float(intercept), math.sqrt(s2 * (1 / n + lx.mean() ** 2 / sxx)))


def fit_scaling(points: list) -> ScalingFit:
    """The whole analysis over finished points (any budgets, any order). Raises FitError when fewer than two
    budgets have a minimum inside their depths."""
    by_budget = {}
    for p in points:
        if math.isfinite(p.val_bpb) and p.val_bpb > 0:
            by_budget.setdefault(p.budget, []).append(p)
    if not by_budget:
        raise FitError("no finished point with a finite val bpb")
    budgets = [fit_budget(c, pts) for c, pts in sorted(by_budget.items())]
    good = [b for b in budgets if b.n_opt is not None]
    if len(good) < 2:
        edges = "; ".join(f"{b.budget:.3g}: {b.edge}" for b in budgets if b.edge)
        raise FitError(f"power laws need at least 2 budgets with a minimum inside their depths, found {len(good)} "
                       f"of {len(budgets)}" + (f" ({edges})" if edges else ""))
    cs = [b.budget for b in good]
    return ScalingFit(budgets=budgets, n_law=fit_power_law(cs, [b.n_opt for b in good]),
                      d_law=fit_power_law(cs, [b.tokens_opt for b in good]), ratios=[b.ratio_opt for b in good])


@dataclass
class Recommendation:
    budget: float
    n_opt: float  # the law's optimal scaling parameters at `budget`
    tokens_opt: float  # the law's optimal tokens
    depth: int
    n: int  # that depth's scaling parameters
    iterations: int
    tokens: int
    batch_size: int


def recommend(fit: ScalingFit, budget: float, sizes: dict, flops_per_token: dict, batch_size: int) -> Recommendation:
    """The depth whose size is nearest N_opt(budget) in log space, trained for `budget` FLOPs.

    `sizes` and `flops_per_token` map each candidate depth to its scaling parameters and training FLOPs per
    token; iterations follow as `--target-flops` computes them (budget / (FLOPs per token x batch))."""
    n_opt = fit.n_law(budget)
    depth = min(sizes, key=lambda d: (abs(math.log(sizes[d] / n_opt)), d))
    iterations = round(budget / (flops_per_token[depth] * batch_size))
    return Recommendation(budget=budget, n_opt=n_opt, tokens_opt=fit.d_law(budget), depth=depth, n=sizes[depth],
                          iterations=iterations, tokens=iterations * batch_size, batch_size=batch_size)
