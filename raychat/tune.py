"""`python -m raychat.tune tune_configs/NAME.yaml`: hyperparameter sweeps of raychat training on Ray Tune.

    python -m raychat.tune tune_configs/cpu_smoke.yaml --dry-run   # validate the file, print the resolved sweep
    python -m raychat.tune tune_configs/d12_lr_wd.yaml             # run it (a local Ray, or RAY_ADDRESS's cluster)
    python -m raychat.tune tune_configs/d12_lr_wd.yaml --resume    # continue an interrupted sweep

Each trial is a Tune function trainable (`train_trial`) that runs raychat's own training: the sweep's base
flags plus the trial's sampled values become one TrainConfig, run as `<sweep>-<trial id>` under
`<sweep dir>/runs/`. A trial of one CPU worker runs the training loop in its own process (`TuneTrialSession`);
a larger one drives a Ray Train job (`raychat.train.build_trainer(...).fit()`), whose rank 0 reports reach
Tune through TuneReportCallback. A retried or resumed trial reruns under the same name, so it continues from
its newest checkpoint. ASHA stops trials on `val_bpb` with `step` as its clock.

When the sweep ends, its directory holds results.md (the table), results.csv, plots/val_bpb_vs_<flag>.png,
best_command.txt (the `python -m raychat.train ...` line reproducing the best trial) and trial_log.jsonl
(when each trial started and ended, across --resume).
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import sys
import time

from raychat import storage
from raychat.common import cli_parser
from raychat.config import TrainConfig
from raychat.sweep_config import Sweep, SweepConfigError, check_cluster, check_plan, load_sweep
from raychat.train import PreflightError

SWEEP_FILE = "sweep.json"  # the resolved sweep, saved at start and compared on --resume
CSV_COLUMNS = ("trial", "status", "steps", "planned_steps", "stopped_early", "final_val_bpb", "min_val_bpb", "run_dir")


# ----------------------------------------------------------------------------------------------------
# The trial: raychat's own Train run, driven from a Tune function trainable


def _report_callback():
    """TuneReportCallback that never hands Tune a result without `val_bpb`.

    The loop carries val_bpb forward in every report once the step-0 eval ran, except the one a NaN stop
    sends ({"step", "stopped"}); Tune's strict metric check would turn that into a trial error. It reaches
    Tune as val_bpb = NaN instead (ASHA and the best-trial choice ignore NaN), and the table shows the stop.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class _SweepReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "val_bpb" not in metrics[0]:
                metrics = [{**metrics[0], "val_bpb": float("nan")}] + list(metrics[1:])
            super().after_report(run_context, metrics, checkpoint)

    return _SweepReportCallback()


def train_trial(config: dict, sweep: dict) -> None:
    """The Tune trainable: one trial = one training run named `<sweep>-<trial id>`.

    `config` holds the sampled flags; `sweep` is `Sweep.to_dict()` (bound with tune.with_parameters). Only
    ray.tune APIs are used here: ray.train calls raise in a Tune driver.
    """
    import ray.tune

    s = Sweep.from_dict(sweep)
    cfg = s.trial_config(dict(config), ray.tune.get_context().get_trial_id())
    cfg.validate()
    run_trial(cfg, s.in_process)


def run_trial(cfg: TrainConfig, in_process: bool) -> None:
    """Train `cfg` from inside a Tune trial: in the trial's own process (one CPU worker: no Train controller and
    worker to start, most of a small trial's time), or as a Ray Train job the trial drives. Either way a
    failure ends the trial, and Tune's retry (max_failures) reruns it under the same run name, which continues
    from the run's newest checkpoint."""
    if in_process:
        from raychat.loop import train
        from raychat.session import TuneTrialSession

        train(cfg, TuneTrialSession(cfg))
        return
    from raychat import local_ray
    from raychat.common import available_cpus
    from raychat.train import build_trainer

    # The trial is the Train run's driver: it resolves `auto` as `python -m raychat.train` would on this Ray.
    cfg = local_ray.resolve_auto(cfg, local=local_ray.is_embedded(), cpus=available_cpus())
    build_trainer(cfg, run_config_extra={"callbacks": [_report_callback()]}).fit()


# ----------------------------------------------------------------------------------------------------
# Building the Tuner


def param_space(sweep: Sweep) -> dict:
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "choice": tune.choice, "grid": tune.grid_search}
    return {flag: make[dist](list(args)) for flag, (dist, args) in sweep.search_space.items()}


def search_alg(sweep: Sweep):
    if sweep.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
            import optuna  # noqa: F401
        except ImportError as e:
            raise SweepConfigError(f"{sweep.path}: search_alg: optuna is not installed ({e}); "
                                   "pip install 'raychat[optuna]' or use search_alg: random") from e
        return OptunaSearch(metric="val_bpb", mode="min", seed=sweep.seed)
    from ray.tune.search import BasicVariantGenerator

    # Random and grid both: the basic generator crosses grid dimensions and samples the rest, seeded. It takes
    # the concurrency limit itself: Tune ignores max_concurrent_trials for a generator passed in (with a warning),
    # and too many concurrent trial drivers hold the CPUs their own workers need.
    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials or 0, random_state=sweep.seed)


def scheduler(sweep: Sweep, max_t: int):
    if sweep.scheduler["type"] != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that reaches max_t ends by itself, after writing its report; with True
    # ASHA would stop it at its final report, before rank 0 writes report.md.
    return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=sweep.scheduler["grace_period"],
                         reduction_factor=sweep.scheduler["reduction_factor"], stop_last_trials=False)


def _trial_log_callback(sweep_dir: str):
    """A Tune callback appending one JSON line per trial start/end: the record --resume is checked against."""
    from ray.tune import Callback

    class _TrialLog(Callback):
        def _write(self, event, trial, **extra):
            with open(os.path.join(sweep_dir, "trial_log.jsonl"), "a") as f:
                f.write(json.dumps({"time": time.time(), "event": event, "trial": trial.trial_id, **extra}) + "\n")

        def on_trial_start(self, iteration, trials, trial, **info):
            self._write("start", trial)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._write("complete", trial, step=(trial.last_result or {}).get("step"))

        def on_trial_error(self, iteration, trials, trial, **info):
            self._write("error", trial)

    return _TrialLog()


def init_ray(sweep: Sweep) -> None:
    """Attach to RAY_ADDRESS's cluster, else start a local Ray big enough for the concurrent trials (logical
    CPUs may exceed cores: with fewer, concurrent trial drivers starve their workers)."""
    from raychat import local_ray

    local_ray.init(sweep.per_trial_resources()["CPU"] * (sweep.max_concurrent_trials or 1))


def check_trial_inputs(sweep: Sweep, dry_run: bool) -> None:
    """The trials' tokenizer, shards and data slots, checked by raychat.train's own preflight before any
    trial starts (a sweep's trials are new runs: there is no checkpoint to resume)."""
    from raychat.train import preflight

    preflight(dataclasses.replace(sweep.base_config(), dry_run=dry_run).resolve_paths(), resume=False)


def _vocab_size(sweep: Sweep) -> int:
    from raychat.train import _vocab_size_if_present

    return _vocab_size_if_present(sweep.base_config())


def build_tuner(sweep: Sweep, max_t: int, resume: bool):
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(train_trial, sweep=sweep.to_dict()),
                                    sweep.trial_process_resources())
    if resume:
        return tune.Tuner.restore(sweep.sweep_dir, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric="val_bpb", mode="min", search_alg=search_alg(sweep), scheduler=scheduler(sweep, max_t),
            num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=sweep.storage_path,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            callbacks=None if storage.is_remote(sweep.sweep_dir) else [_trial_log_callback(sweep.sweep_dir)],
            verbose=1),
    )


# ----------------------------------------------------------------------------------------------------
# Results: table, CSV, plots, the best trial's command


@dataclasses.dataclass
class TrialRow:
    trial: str
    config: dict
    status: str  # done | stopped early | error | nan stop | never reported
    steps: int | None
    planned_steps: int
    final_val_bpb: float
    min_val_bpb: float
    run_dir: str

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped early"


def _nan(x) -> float:
    try:
        return float(x) if x is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def summarize(sweep: Sweep, result_grid, vocab_size: int) -> list[TrialRow]:
    """One row per trial, from Tune's results (last report + every report's val_bpb)."""
    from raychat.config import derive

    rows = []
    for result in result_grid:
        trial = os.path.basename(result.path.rstrip("/"))
        config = {k: result.config[k] for k in sweep.search_space if k in result.config}
        cfg = sweep.trial_config(config, trial)
        planned = derive(cfg, vocab_size, cfg.num_workers).num_iterations
        m = result.metrics or {}
        steps = m.get("step")
        history = []
        df = result.metrics_dataframe
        if df is not None and "val_bpb" in df:
            history = [v for v in df["val_bpb"].tolist() if v is not None and math.isfinite(v)]
        min_bpb = min(history + ([m["min_val_bpb"]] if math.isfinite(_nan(m.get("min_val_bpb"))) else []),
                      default=float("nan"))
        if result.error is not None:
            status = "error"
        elif m.get("stopped"):
            status = "nan stop"
        elif steps is None:
            status = "never reported"
        elif steps < planned:
            status = "stopped early"
        else:
            status = "done"
        rows.append(TrialRow(trial=trial, config=config, status=status, steps=steps, planned_steps=planned,
                             final_val_bpb=_nan(m.get("val_bpb")), min_val_bpb=min_bpb,
                             run_dir=f"{sweep.runs_dir}/{cfg.run_name}"))
    return sorted(rows, key=lambda r: r.trial)


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the lowest minimum val bpb (the reference's 'Minimum validation bpb'); ties by trial id."""
    scored = [r for r in rows if math.isfinite(r.min_val_bpb)]
    return min(scored, key=lambda r: (r.min_val_bpb, r.trial)) if scored else None


def train_command(cfg: TrainConfig) -> str:
    """The `python -m raychat.train` line that runs `cfg`: every flag that differs from its default."""
    parts = ["python", "-m", "raychat.train"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if value == f.default or f.name == "dry_run":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parts.append(flag)
        else:
            parts.append(f"{flag}={shlex.quote(repr(value) if isinstance(value, float) else str(value))}")
    return " ".join(parts)


def best_command(sweep: Sweep, row: TrialRow) -> str:
    # A fresh run name: the trial's own name would resume (and, finished, train 0 steps).
    cfg = dataclasses.replace(sweep.trial_config(row.config, row.trial), run_name=f"{sweep.name}-best-{row.trial}",
                              storage_path=None)
    return train_command(cfg)


def _fmt(x, digits=4) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else (f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}")
    return str(x)


def write_outputs(sweep: Sweep, rows: list[TrialRow], out_dir: str) -> str:
    """results.md, results.csv, plots/*.png and best_command.txt in `out_dir`. Returns the best command."""
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    flags = list(sweep.search_space)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(CSV_COLUMNS[:2]) + flags + list(CSV_COLUMNS[2:]))
        for r in rows:
            w.writerow([r.trial, r.status] + [r.config.get(k) for k in flags] +
                       [r.steps, r.planned_steps, r.stopped_early, r.final_val_bpb, r.min_val_bpb, r.run_dir])

    best = best_row(rows)
    command = best_command(sweep, best) if best else ""
    lines = [f"# Sweep {sweep.name}", "",
             f"{len(rows)} trials; search {sweep.search_alg}; scheduler {sweep.scheduler['type']}; "
             f"sweep file {sweep.path}", "",
             "| trial | " + " | ".join(flags) + " | final val bpb | min val bpb | steps | stopped early | status |",
             "|---" * (len(flags) + 6) + "|"]
    for r in rows:
        mark = " **(best)**" if best is r else ""
        lines.append(f"| {r.trial}{mark} | " + " | ".join(_fmt(r.config.get(k)) for k in flags) +
                     f" | {_fmt(r.final_val_bpb)} | {_fmt(r.min_val_bpb)} | {r.steps}/{r.planned_steps} | "
                     f"{'yes' if r.stopped_early else 'no'} | {r.status} |")
    if best:
        lines += ["", f"Best trial: {best.trial} (min val bpb {best.min_val_bpb:.6f}). Reproduce it with:", "",
                  "```", command, "```"]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "best_command.txt"), "w") as f:
        f.write(command + "\n")
    _plot(sweep, rows, os.path.join(out_dir, "plots"))
    return command


def _plot(sweep: Sweep, rows: list[TrialRow], plot_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for flag, (dist, values) in sweep.search_space.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        numeric = all(isinstance(r.config.get(flag), (int, float)) for r in rows)
        position = (lambda v: v) if numeric else (lambda v, order=[repr(x) for x in values]: order.index(repr(v)))
        for label, pick, marker in (("ran to the end", lambda r: not r.stopped_early, "o"),
                                    ("stopped early", lambda r: r.stopped_early, "x")):
            pts = [(position(r.config[flag]), r.final_val_bpb) for r in rows
                   if pick(r) and flag in r.config and math.isfinite(r.final_val_bpb)]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=label)
        if numeric and dist == "loguniform":
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(flag)
        ax.set_ylabel("final val bpb")
        ax.set_title(f"{sweep.name}: val bpb vs {flag}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(plot_dir, f"val_bpb_vs_{flag}.png"))
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Running a sweep


def _check_resume_matches(sweep: Sweep) -> None:
    """--resume must continue the sweep that was started: the same resolved file."""
    saved_path = os.path.join(sweep.sweep_dir, SWEEP_FILE)
    if not os.path.exists(saved_path):
        return
    with open(saved_path) as f:
        saved = json.load(f)
    now = json.loads(json.dumps(sweep.to_dict()))
    changed = sorted(k for k in now if k != "path" and saved.get(k) != now[k])
    if changed:
        raise SweepConfigError(f"{sweep.path}: {', '.join(changed)} changed since the sweep started "
                               f"(saved in {saved_path}); restore the file or start a new sweep under another name")


def run_sweep(sweep: Sweep, resume: bool = False) -> tuple[list[TrialRow], str]:
    """Run (or, with resume, continue) the sweep; write its outputs. Returns the rows and the best command."""
    import ray
    from ray import tune

    remote = storage.is_remote(sweep.sweep_dir)
    exists = tune.Tuner.can_restore(sweep.sweep_dir)
    if resume and not exists:
        raise SweepConfigError(f"--resume: no sweep to continue at {sweep.sweep_dir}; run without --resume to start it")
    if not resume and exists:
        raise SweepConfigError(f"sweep {sweep.name!r} already exists at {sweep.sweep_dir}; pass --resume to continue "
                               "it, or set another name (name: or --name) for a new sweep")
    if resume:
        _check_resume_matches(sweep)
    vocab_size = _vocab_size(sweep)
    plan = check_plan(sweep, vocab_size)
    init_ray(sweep)
    check_cluster(sweep, ray.cluster_resources())
    if not remote:
        os.makedirs(sweep.sweep_dir, exist_ok=True)
        with open(os.path.join(sweep.sweep_dir, SWEEP_FILE), "w") as f:
            json.dump(sweep.to_dict(), f, indent=2)

    result_grid = build_tuner(sweep, plan.num_iterations, resume).fit()
    rows = summarize(sweep, result_grid, vocab_size)
    if remote:
        import tempfile

        out = tempfile.mkdtemp(prefix="raychat-sweep-")
        command = write_outputs(sweep, rows, out)
        storage.copy_into(out, sweep.sweep_dir)
    else:
        command = write_outputs(sweep, rows, sweep.sweep_dir)
    return rows, command


def describe(sweep: Sweep, plan) -> str:
    """The resolved sweep, as --dry-run prints it."""
    res = sweep.per_trial_resources()
    lines = [f"Sweep {sweep.name}: {sweep.num_trials()} trial(s), search {sweep.search_alg} (seed {sweep.seed}), "
             f"scheduler {sweep.scheduler}",
             f"  directory: {sweep.sweep_dir} (trial runs in {sweep.runs_dir})",
             f"  per trial: {sweep.resources['workers']} worker(s) "
             f"({'in the trial process' if sweep.in_process else 'a Ray Train job'}), {res['CPU']:g} CPU(s), "
             f"{res['GPU']:g} GPU(s); "
             f"max concurrent trials: {sweep.max_concurrent_trials or 'as many as fit'}; "
             f"retries per trial: {sweep.max_failures}",
             f"  steps per trial: {plan.num_iterations} (base flags; searched flags may change it)",
             "  search space:"]
    lines += [f"    {flag}: {dist} {args}" for flag, (dist, args) in sweep.search_space.items()]
    lines.append("  a trial runs: " + train_command(dataclasses.replace(sweep.base_config(),
                                                                       run_name=f"{sweep.name}-<trial>")))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = cli_parser("raychat.tune", "Sweep raychat training hyperparameters with Ray Tune (ASHA on val bpb)")
    p.add_argument("sweep_file", help="a sweep YAML file, e.g. tune_configs/cpu_smoke.yaml (schema: docs/TUNE.md)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    p.add_argument("--dry-run", action="store_true", help="validate the file and the trials' tokenizer and shards, print the resolved sweep, exit")
    p.add_argument("--name", help="override the sweep's name (its directory)")
    p.add_argument("--storage-path", help="override the sweep's storage_path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of the file, e.g. --set train.data_dir=/data --set num_samples=8 "
                        "(VALUE is read as YAML)")
    return p


def _overrides(args) -> dict:
    import yaml

    out = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.depth=4")
        out[key] = yaml.safe_load(value)
    if args.name is not None:
        out["name"] = args.name
    if args.storage_path is not None:
        out["storage_path"] = args.storage_path
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = load_sweep(args.sweep_file, _overrides(args))
        plan = check_plan(sweep, _vocab_size(sweep))
        check_trial_inputs(sweep, dry_run=args.dry_run)
        if args.dry_run:
            print(describe(sweep, plan))
            return 0
        rows, command = run_sweep(sweep, resume=args.resume)
    except (SweepConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("" if storage.is_remote(sweep.sweep_dir) else open(os.path.join(sweep.sweep_dir, "results.md")).read())
    if not command:
        print("error: no trial reported a finite val bpb", file=sys.stderr)
        return 1
    print(f"Outputs in {sweep.sweep_dir}\nBest trial, reproduced by:\n{command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
