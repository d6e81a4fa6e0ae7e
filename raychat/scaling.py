"""`python -m raychat.scaling tune_configs/NAME.yaml`: nanochat's isoFLOP scaling-law study on Ray Tune.

    python -m raychat.scaling tune_configs/scaling_cpu_tiny.yaml --dry-run   # check the file, print the grid
    python -m raychat.scaling tune_configs/scaling_cpu_tiny.yaml             # run it (rerun: continue it)
    python -m raychat.scaling tune_configs/scaling_cpu_tiny.yaml --report-only --target-flops 1e15

Every grid point (a FLOP budget x a depth, or in a miniseries a depth at a fixed tokens:params ratio) is one
Tune trial that runs raychat's own training as the run `<study>-<point>` under `<study dir>/runs/`. A point
with more than one worker or a GPU runs as a Ray Train job (raychat.train.build_trainer); a single CPU worker
runs the training loop inside the trial process itself, which saves the Train controller and worker start-up
(most of a tiny point's time). Points are never stopped early: the fit needs every one.

As each point finishes, the driver appends its row to `results.csv` (nanochat's columns). A rerun of the same
study skips the points the CSV holds and resumes the others from their newest checkpoints (a run resumes by
its name); budgets or depths added to the file since are run too. At the end `scaling_fit` fits the laws and
the report (stdout, `scaling_report.md`, `scaling.png`) recommends a model for the target budget.
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time


from raychat import storage
from raychat.common import cli_parser
from raychat.config import TrainConfig
from raychat.scaling_fit import FitError, Point, fit_scaling, recommend
from raychat.sweep_config import Sweep, SweepConfigError, _Checker, parse_sweep, read_yaml
from raychat.train import PreflightError

STUDY_KEYS = ("budgets", "depths", "ratio", "target_flops", "in_process")
SWEEP_KEYS = ("name", "storage_path", "train", "max_concurrent_trials", "resources", "max_failures")
# The flags each point sets itself (its horizon and its model size).
POINT_FLAGS = {"depth": "list the depths under depths:",
               "num_iterations": "a point's horizon comes from its budget (or the ratio)",
               "target_flops": "list the budgets under budgets:",
               "target_param_data_ratio": "a miniseries sets it with ratio:; an isoFLOP study leaves it at -1"}
CSV_COLUMNS = ("flops_budget", "depth", "model_dim", "params_wte", "params_value_embeds", "params_lm_head",
               "params_transformer", "params_scalars", "params_total", "params_scaling", "num_iterations",
               "tokens_trained", "param_data_ratio", "train_flops", "val_bpb", "min_val_bpb", "core_score",
               "train_time_sec", "wall_time_sec", "run_name")
STUDY_FILE = "study.json"


# ----------------------------------------------------------------------------------------------------
# The study file


@dataclasses.dataclass
class Study:
    sweep: Sweep  # name, storage, fixed train flags, resources, concurrency, retries (raychat.sweep_config)
    depths: list
    budgets: list | None  # isoFLOP mode
    ratio: float | None  # miniseries mode: tokens per scaling parameter
    target_flops: float | None  # the budget to recommend a model for
    in_process: bool  # run each point's loop in its trial process (one CPU worker only)

    @property
    def name(self) -> str:
        return self.sweep.name

    @property
    def study_dir(self) -> str:
        return self.sweep.sweep_dir

    def points(self) -> list:
        """[{"budget": C or None, "depth": d}, ...] in grid order (budgets outer, as nanochat runs them)."""
        if self.budgets is None:
            return [{"budget": None, "depth": d} for d in self.depths]
        return [{"budget": c, "depth": d} for c in self.budgets for d in self.depths]

    def point_tag(self, point: dict) -> str:
        head = _short(point["budget"]) if point["budget"] is not None else f"r{self.ratio:g}"
        return f"{head}-d{point['depth']}"

    def point_config(self, point: dict) -> TrainConfig:
        if point["budget"] is None:
            flags = {"depth": point["depth"], "target_param_data_ratio": self.ratio}
        else:
            flags = {"depth": point["depth"], "target_flops": float(point["budget"]), "target_param_data_ratio": -1.0}
        return self.sweep.trial_config(flags, self.point_tag(point))

    def to_dict(self) -> dict:
        return {"sweep": self.sweep.to_dict(), "depths": self.depths, "budgets": self.budgets, "ratio": self.ratio,
                "target_flops": self.target_flops, "in_process": self.in_process}

    @classmethod
    def from_dict(cls, d: dict) -> "Study":
        return cls(**{**d, "sweep": Sweep.from_dict(d["sweep"])})


def _short(c: float) -> str:
    """1e18 -> '1e18', 2.15e18 -> '2.15e18', 3e9 -> '3e9': a budget as it reads in a run name."""
    mantissa, _, exponent = f"{c:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def parse_study(data, path: str, text: str = "", overrides: dict | None = None) -> Study:
    """Validate a loaded study mapping; errors name file:line and key, as sweep files' do."""
    chk = _Checker(path, text)
    data = dict(chk.mapping(data, (), STUDY_KEYS + SWEEP_KEYS))
    for dotted, value in (overrides or {}).items():  # --set KEY=VALUE, as if written in the file
        parts, node = dotted.split("."), data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                chk.fail(tuple(parts), "--set names a key inside a value that is not a mapping")
        node[parts[-1]] = value
    data = chk.mapping(data, (), STUDY_KEYS + SWEEP_KEYS)

    depths = data.get("depths")
    if not isinstance(depths, list) or not depths:
        chk.fail(("depths",), "must list the depths to train, e.g. depths: [8, 10, 12]")
    for d in depths:
        chk.integer(d, ("depths",), 1)
    if len(set(depths)) != len(depths):
        chk.fail(("depths",), f"lists a depth twice: {depths}")
    budgets, ratio = data.get("budgets"), data.get("ratio")
    if (budgets is None) == (ratio is None):
        chk.fail(("budgets",), "give exactly one of budgets: (an isoFLOP study, FLOPs per point) or ratio: "
                 "(a miniseries, tokens per scaling parameter)")
    if budgets is not None:
        if not isinstance(budgets, list) or not budgets:
            chk.fail(("budgets",), "must list FLOP budgets, e.g. budgets: [1e18, 2.15e18]")
        budgets = [chk.number(c, ("budgets",), 0, strict=True) for c in budgets]
        if len(set(budgets)) != len(budgets):
            chk.fail(("budgets",), f"lists a budget twice: {budgets}")
        budgets = sorted(budgets)
    else:
        ratio = chk.number(ratio, ("ratio",), 0, strict=True)
    target = data.get("target_flops")
    if target is not None:
        target = chk.number(target, ("target_flops",), 0, strict=True)

    train = chk.mapping(data.get("train"), ("train",))
    for key in train:
        if str(key).replace("-", "_") in POINT_FLAGS:
            chk.fail(("train", str(key)), f"each point sets this flag itself: {POINT_FLAGS[str(key).replace('-', '_')]}")
    # The fixed flags, resources and storage are a sweep's, validated by its rules; the grid is its only dimension.
    sweep_data = {k: data[k] for k in SWEEP_KEYS if k in data}
    sweep_data.update(search_space={"depth": {"grid": list(depths)}}, search_alg="grid", scheduler={"type": "fifo"})
    try:
        sweep = parse_sweep(sweep_data, path, text)
    except SweepConfigError as e:  # a depth the training rules refuse (too narrow a model): name it as `depths`
        head, sep, rule = str(e).partition("search_space.depth: ")
        if not sep:
            raise
        chk.fail(("depths",), rule)

    if sweep.base_config().total_batch_size == -1:
        chk.fail(("train", "total_batch_size"), "a study compares its points at one batch size: the automatic one "
                 "(-1, --recipe 2026-07's default) follows each point's horizon; give a number of tokens")
    res = sweep.resources
    simple = res["workers"] == 1 and res["gpus_per_worker"] == 0
    in_process = data.get("in_process", simple)
    if not isinstance(in_process, bool):
        chk.fail(("in_process",), f"{in_process!r} must be true or false")
    if in_process and not simple:
        chk.fail(("in_process",), "runs a point's loop inside its trial process, which holds one CPU worker: "
                 "it needs resources.workers 1 and gpus_per_worker 0")
    return Study(sweep=sweep, depths=list(depths), budgets=budgets, ratio=ratio, target_flops=target,
                 in_process=in_process)


def load_study(path: str, overrides: dict | None = None) -> Study:
    data, text = read_yaml(path, "study file")
    return parse_study(data, path, text, overrides)


# ----------------------------------------------------------------------------------------------------
# Each point's plan (model size, horizon) and its CSV row


def point_plans(study: Study, vocab_size: int) -> dict:
    """{run name: (point, plan)}; a point whose budget buys no step fails here."""
    from raychat.config import derive

    out = {}
    for point in study.points():
        cfg = study.point_config(point)
        plan = derive(cfg, vocab_size, cfg.num_workers)
        if plan.num_iterations < 1:
            raise SweepConfigError(f"{study.sweep.path}: point {study.point_tag(point)}: the budget buys "
                                   f"{plan.num_iterations} steps of {plan.total_batch_size:,} tokens at depth "
                                   f"{point['depth']}; raise the budget or lower train.total_batch_size")
        out[cfg.run_name] = (point, plan)
    return out


def csv_row(point: dict, plan, run_name: str, metrics: dict, wall_s: float | None) -> dict:
    counts = plan.param_counts
    return {
        "flops_budget": "" if point["budget"] is None else _short(point["budget"]), "depth": point["depth"],
        "model_dim": plan.model_config["n_embd"], "params_wte": counts["wte"],
        "params_value_embeds": counts["value_embeds"], "params_lm_head": counts["lm_head"],
        "params_transformer": counts["transformer_matrices"], "params_scalars": counts["scalars"],
        "params_total": counts["total"], "params_scaling": plan.num_scaling_params,
        "num_iterations": plan.num_iterations, "tokens_trained": plan.total_tokens,
        "param_data_ratio": f"{plan.total_tokens / plan.num_scaling_params:.3f}",
        "train_flops": f"{plan.num_flops_per_token * plan.total_tokens:.4g}",
        "val_bpb": metrics.get("val_bpb"), "min_val_bpb": metrics.get("min_val_bpb"),
        "core_score": "" if metrics.get("core_metric") is None else metrics["core_metric"],
        "train_time_sec": f"{metrics.get('total_training_time', float('nan')):.2f}",
        "wall_time_sec": "" if wall_s is None else f"{wall_s:.1f}", "run_name": run_name,
    }


def rows_to_points(rows: list) -> list:
    """The CSV rows of an isoFLOP study as scaling_fit Points (miniseries rows have no budget)."""
    return [Point(budget=float(r["flops_budget"]), depth=int(r["depth"]), n=float(r["params_scaling"]),
                  tokens=float(r["tokens_trained"]), val_bpb=float(r["val_bpb"] or "nan"))
            for r in rows if r.get("flops_budget")]


class Results:
    """results.csv in the study directory (local, or a bucket through a local copy written back per row)."""

    def __init__(self, study_dir: str):
        self.path = storage.join(study_dir, "results.csv")
        self.rows = []
        fs, p = storage.filesystem(self.path)
        if fs.get_file_info(p).type.name == "File":
            with fs.open_input_stream(p) as f:
                self.rows = list(csv.DictReader(io.StringIO(f.read().decode())))

    def done(self) -> set:
        return {r["run_name"] for r in self.rows}

    def add(self, row: dict) -> None:
        self.rows = [r for r in self.rows if r["run_name"] != row["run_name"]] + [row]
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "results.csv")
            with open(local, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                w.writeheader()
                w.writerows(self.rows)
            storage.copy_file_to(local, self.path)


# ----------------------------------------------------------------------------------------------------
# The trial: one point


def run_point(config: dict, study: dict) -> None:
    """The Tune trainable: train point `config["point"]` as the run `<study>-<point>`; a retry or a rerun
    resumes that run from its newest checkpoint."""
    from raychat.tune import run_trial

    s = Study.from_dict(study)
    cfg = s.point_config(config["point"])
    cfg.validate()
    run_trial(cfg, s.in_process)


def _row_writer(study: Study, plans: dict, results: Results):
    """A driver-side Tune callback: a point's CSV row as soon as it finishes (with its wall time)."""
    from ray.tune import Callback

    class _RowWriter(Callback):
        def __init__(self):
            self.started = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.trial_id, time.time())

        def on_trial_complete(self, iteration, trials, trial, **info):
            metrics = trial.last_result or {}
            if not metrics.get("stopped") and math.isfinite(metrics.get("val_bpb", float("nan"))):
                run_name = study.point_config(trial.config["point"]).run_name
                point, plan = plans[run_name]
                wall = time.time() - self.started.get(trial.trial_id, time.time())
                results.add(csv_row(point, plan, run_name, metrics, wall))
                print(f"[scaling] {run_name}: val bpb {metrics['val_bpb']:.4f} ({len(results.rows)} points done)")

    return _RowWriter()


def run_study(study: Study, plans: dict) -> Results:
    """Run every point the CSV does not hold yet; returns the results."""
    import ray
    from ray import tune

    from raychat import local_ray
    from raychat.sweep_config import check_cluster

    results = Results(study.study_dir)
    pending = [p for name, (p, _) in plans.items() if name not in results.done()]
    print(f"[scaling] {study.name}: {len(plans) - len(pending)} of {len(plans)} points in {results.path}; "
          f"running {len(pending)}")
    if not pending:
        return results
    local_ray.init(study.sweep.per_trial_resources(study.in_process)["CPU"] * (study.sweep.max_concurrent_trials or 1))
    if not study.in_process:
        check_cluster(study.sweep, ray.cluster_resources(), in_process=False)
    trainable = tune.with_resources(tune.with_parameters(run_point, study=study.to_dict()),
                                    study.sweep.trial_process_resources(study.in_process))
    tuner = tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.sweep.max_concurrent_trials,
                                    trial_dirname_creator=lambda t: t.trial_id),
        # Each invocation is its own Tune experiment: what carries over between reruns is the CSV and the
        # points' run directories, not Tune's state.
        run_config=tune.RunConfig(name=time.strftime("tune-%Y%m%d-%H%M%S"),
                                  storage_path=storage.join(study.study_dir, "tune"),
                                  failure_config=tune.FailureConfig(max_failures=study.sweep.max_failures),
                                  callbacks=[_row_writer(study, plans, results)], verbose=1))
    tuner.fit()
    return results


# ----------------------------------------------------------------------------------------------------
# The report


def _pm(x: float, se: float) -> str:
    return f"{x:.3f}" if math.isnan(se) else f"{x:.3f} ± {se:.3f}"


def candidate_sizes(study: Study, vocab_size: int, max_depth: int = 64):
    """Scaling parameters and FLOPs per token of every depth 1..max_depth with the study's fixed flags."""
    from raychat.config import derive

    sizes, fpt = {}, {}
    for d in range(1, max(max_depth, max(study.depths)) + 1):
        cfg = dataclasses.replace(study.sweep.base_config(), depth=d, num_iterations=1)
        plan = derive(cfg, vocab_size, 1)
        sizes[d], fpt[d] = plan.num_scaling_params, plan.num_flops_per_token
    return sizes, fpt


def recommended_command(study: Study, depth: int, budget: float) -> str:
    from raychat.tune import train_command

    cfg = study.point_config({"budget": budget, "depth": depth})
    return train_command(dataclasses.replace(cfg, run_name=f"{study.name}-recommended-{_short(budget)}-d{depth}",
                                             storage_path=None))


def build_report(study: Study, rows: list, total_points: int, vocab_size: int, target: float | None) -> tuple:
    """(markdown, fit or None): the points, the fit with uncertainties, the recommendation."""
    md = [f"# Scaling study {study.name}", "",
          f"{len(rows)} of {total_points} points finished; CSV: results.csv; study file {study.sweep.path}", "",
          "| budget | depth | scaling params | tokens | tokens/param | val bpb | CORE | train s | wall s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (float(r["flops_budget"] or 0), int(r["depth"]))):
        md.append(f"| {r['flops_budget'] or '-'} | {r['depth']} | {int(r['params_scaling']):,} | "
                  f"{int(r['tokens_trained']):,} | {float(r['param_data_ratio']):.1f} | {float(r['val_bpb']):.4f} | "
                  f"{r['core_score'] or '-'} | {r['train_time_sec']} | {r['wall_time_sec'] or '-'} |")
    if study.budgets is None:
        md += ["", f"Miniseries at {study.ratio:g} tokens per scaling parameter: no isoFLOP fit."]
        return "\n".join(md) + "\n", None
    try:
        fit = fit_scaling(rows_to_points(rows))
    except FitError as e:
        md += ["", f"**No fit**: {e}."]
        return "\n".join(md) + "\n", None
    md += ["", "## IsoFLOP minima (quadratic of val bpb in log10 N per budget)", "",
           "| budget | N_opt | D_opt (tokens) | tokens/param | val bpb at N_opt | note |", "|---|---|---|---|---|---|"]
    for b in fit.budgets:
        if b.n_opt is None:
            md.append(f"| {_short(b.budget)} | - | - | - | - | {b.edge} (left out of the laws) |")
        else:
            md.append(f"| {_short(b.budget)} | {b.n_opt:,.0f} | {b.tokens_opt:,.0f} | {b.ratio_opt:.1f} | "
                      f"{b.bpb_opt:.4f} | |")
    ratios = fit.ratios
    ref = fit.reference_budget
    md += ["", "## Power laws (least squares in log-log; ± one standard error)", "",
           f"- N_opt ∝ C^{_pm(fit.n_law.exponent, fit.n_law.exponent_se)}",
           f"- D_opt ∝ C^{_pm(fit.d_law.exponent, fit.d_law.exponent_se)}",
           f"- a + b = {fit.n_law.exponent + fit.d_law.exponent:.3f} (1 when C ∝ N·D holds at the optima)",
           f"- optimal tokens:params ratio: {fit.ratio_at(ref):.1f} from the laws at C = {ref:.3g}; "
           f"{sum(ratios) / len(ratios):.1f}" + (f" ± {_std(ratios):.1f}" if len(ratios) > 1 else "")
           + f" over the {len(ratios)} fitted budgets ({', '.join(f'{r:.1f}' for r in ratios)})"]
    if len(ratios) == 2:
        md.append("- two budgets: the lines pass through both points exactly, so no standard error is given; "
                  "a third budget measures it")
    target = target or study.target_flops or 10 * max(study.budgets)
    sizes, fpt = candidate_sizes(study, vocab_size)
    rec = recommend(fit, target, sizes, fpt, study.sweep.base_config().total_batch_size)
    md += ["", f"## Recommendation for C = {target:.3g} FLOPs", "",
           f"- the laws give N_opt = {rec.n_opt:,.0f} scaling params and D_opt = {rec.tokens_opt:,.0f} tokens "
           f"(ratio {rec.tokens_opt / rec.n_opt:.1f})",
           f"- nearest depth: **d{rec.depth}** ({rec.n:,} scaling params, {rec.n / rec.n_opt:.2f}x N_opt)",
           f"- {rec.iterations:,} iterations x {rec.batch_size:,} tokens per step = {rec.tokens:,} tokens "
           f"(ratio {rec.tokens / rec.n:.1f})"]
    if target > 10 * max(study.budgets) * 1.0001 or target < min(study.budgets) / 10:
        md.append(f"- note: {target:.3g} lies more than 10x outside the measured budgets; the laws are extrapolated")
    if rec.depth == max(sizes):
        md.append(f"- note: N_opt exceeds the largest candidate depth d{rec.depth}")
    md += ["", "```", recommended_command(study, rec.depth, target), "```"]
    return "\n".join(md) + "\n", fit


def _std(xs: list) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def plot(fit, rows: list, path: str) -> bool:
    """isoFLOP curves with their minima, and the two power laws, in one PNG; False without matplotlib."""
    import numpy as np

    from raychat.report import pyplot

    plt = pyplot()
    if plt is None:
        return False

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(fit.budgets)))
    ax = axes[0]
    for b, color in zip(fit.budgets, colors):
        x = np.log10([p.n for p in b.points])
        ax.plot(10**x, [p.val_bpb for p in b.points], "o", color=color, label=f"{b.budget:.3g}")
        xs = np.linspace(x.min() - 0.05, x.max() + 0.05, 100)
        ax.plot(10**xs, np.polyval(b.coeffs, xs), "--", color=color)
        if b.n_opt is not None:
            ax.scatter([b.n_opt], [b.bpb_opt], s=180, marker="*", color=color, edgecolors="black", zorder=5)
    ax.set(xscale="log", xlabel="scaling parameters N", ylabel="val bpb", title="isoFLOP curves (★ fitted minimum)")
    ax.legend(title="FLOPs")
    good = [b for b in fit.budgets if b.n_opt is not None]
    cs = np.array([b.budget for b in good])
    span = np.logspace(np.log10(cs.min()) - 0.3, np.log10(cs.max()) + 0.3, 50)
    for ax, law, ys, label in ((axes[1], fit.n_law, [b.n_opt for b in good], "N_opt"),
                               (axes[2], fit.d_law, [b.tokens_opt for b in good], "D_opt (tokens)")):
        ax.loglog(cs, ys, "o", markersize=9)
        ax.loglog(span, [law(c) for c in span], "r--", label=f"{label.split()[0]} ∝ C^{law.exponent:.3f}")
        ax.set(xlabel="FLOPs C", ylabel=label, title=f"{label} vs compute")
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(study: Study, results: Results, total_points: int, vocab_size: int, target: float | None) -> str:
    """scaling_report.md (+ scaling.png) into the study directory; returns the markdown."""
    md, fit = build_report(study, results.rows, total_points, vocab_size, target)
    with tempfile.TemporaryDirectory() as tmp:
        if fit is not None:
            if plot(fit, results.rows, os.path.join(tmp, "scaling.png")):
                md += "\n![isoFLOP curves and power laws](scaling.png)\n"
            else:
                md += "\nPlot skipped: matplotlib is not installed (`pip install matplotlib`).\n"
        with open(os.path.join(tmp, "scaling_report.md"), "w") as f:
            f.write(md)
        storage.copy_into(tmp, study.study_dir)
    return md


# ----------------------------------------------------------------------------------------------------
# The command line


def _check_same_study(study: Study) -> None:
    """A rerun continues the study only with the same fixed flags: its finished rows were trained with them.
    Budgets and depths may be added (or removed) freely."""
    path = storage.join(study.study_dir, STUDY_FILE)
    fs, p = storage.filesystem(path)
    now = json.loads(json.dumps(study.to_dict()))
    if fs.get_file_info(p).type.name == "File":
        with fs.open_input_stream(p) as f:
            saved = json.loads(f.read().decode())
        changed = sorted(k for k in ("train", "resources") if saved["sweep"].get(k) != now["sweep"][k])
        if saved.get("ratio") != now["ratio"]:
            changed.append("ratio")
        if changed:
            raise SweepConfigError(f"{study.sweep.path}: {', '.join(changed)} changed since the study started "
                                   f"(saved in {path}); restore them or start a new study under another name")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, STUDY_FILE), "w") as f:
            json.dump(now, f, indent=2)
        storage.copy_into(tmp, study.study_dir)


def describe(study: Study, plans: dict) -> str:
    res = study.sweep.resources
    mode = (f"isoFLOP: {len(study.budgets)} budget(s) x {len(study.depths)} depth(s)" if study.budgets
            else f"miniseries at {study.ratio:g} tokens/param: {len(study.depths)} depth(s)")
    lines = [f"Scaling study {study.name}: {mode} = {len(plans)} point(s)",
             f"  directory: {study.study_dir} (point runs in {study.sweep.runs_dir})",
             f"  per point: {res['workers']} worker(s) x {res['gpus_per_worker']} GPU, "
             f"{'in the trial process' if study.in_process else 'a Ray Train job'}; max concurrent: "
             f"{study.sweep.max_concurrent_trials or 'as many as fit'}; retries: {study.sweep.max_failures}",
             "  point                 scaling params   steps      tokens  tokens/param"]
    for name, (point, plan) in plans.items():
        lines.append(f"  {study.point_tag(point):20s} {plan.num_scaling_params:15,} {plan.num_iterations:7,} "
                     f"{plan.total_tokens:12,} {plan.total_tokens / plan.num_scaling_params:12.1f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = cli_parser("raychat.scaling", "nanochat's isoFLOP scaling-law study on Ray Tune: train the grid, fit the "
                                      "laws, recommend a model for a budget")
    p.add_argument("study_file", help="a study YAML file, e.g. tune_configs/scaling_cpu_tiny.yaml (docs/SCALING.md)")
    p.add_argument("--dry-run", action="store_true", help="check the file, shards and tokenizer; print the grid; exit")
    p.add_argument("--report-only", action="store_true", help="fit and report the points already in results.csv")
    p.add_argument("--target-flops", type=float, help="the budget to recommend a model for (default: the file's "
                                                      "target_flops, else 10x its largest budget)")
    p.add_argument("--name", help="override the study's name (its directory)")
    p.add_argument("--storage-path", help="override the study's storage_path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the file, e.g. --set train.data_dir=/data (VALUE is read as YAML)")
    return p


def main(argv=None) -> int:
    from raychat.tune import _overrides, check_trial_inputs

    args = build_parser().parse_args(argv)
    try:
        if args.target_flops is not None and not args.target_flops > 0:
            raise SweepConfigError(f"--target-flops {args.target_flops}: must be a positive number of FLOPs")
        study = load_study(args.study_file, _overrides(args))
        check_trial_inputs(study.sweep, dry_run=args.dry_run or args.report_only)
        from raychat.train import _vocab_size_if_present

        vocab_size = _vocab_size_if_present(study.sweep.base_config())
        plans = point_plans(study, vocab_size)
        if args.dry_run:
            print(describe(study, plans))
            return 0
        if args.report_only:
            results = Results(study.study_dir)
        else:
            _check_same_study(study)
            results = run_study(study, plans)
        results.rows = [r for r in results.rows if r["run_name"] in plans]  # a depth or budget dropped since
        md = write_report(study, results, len(plans), vocab_size, args.target_flops)
    except (SweepConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    print(f"Outputs in {study.study_dir}")
    missing = len(plans) - len(results.rows)  # the rows were narrowed to the plans' points above
    if missing:
        print(f"error: {missing} point(s) did not finish; rerun the same command to continue them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
