"""The end-of-run report: markdown plus PNG plots, written into the run's directory.

The markdown keeps the reference's three blocks (user config, setup, outcomes) and adds what a Ray user
wants beside them: the run name, world layout and plots of train loss and val bpb over steps.
"""
import datetime
import os
import platform
import shutil
import tempfile

import torch

from raychat import storage
from raychat.config import describe_changes
from raychat.runs import run_dir


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
        return f"{v:,}"
    return str(v)


def _section(title: str, items: dict) -> str:
    lines = [f"### {title}", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in items.items() if v is not None and v != ""]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot, headless; None where matplotlib is not installed (a slim image): the report is then
    written without its plots rather than failing at the end of a run."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(plt, series: list, ylabel: str, path: str, title: str, mark_points: bool = False) -> bool:
    """A line plot of [(step, value), ...]; `mark_points` marks every point (evaluations are few and far
    apart: the line between two of them is no measurement)."""
    if not series:
        return False
    steps, values = zip(*series)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, marker="o" if mark_points or len(steps) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _config_items(cfg) -> dict:
    """The flags, with the reference's `run` flag shown as what it means here: wandb on (its run name) or off."""
    items = cfg.user_config()
    run = items.pop("run")
    return {"wandb": "off" if run == "dummy" else f"on (run {run})", **items}


def render_report(cfg, plan, summary: dict, history: dict, out_dir: str) -> str:
    """Write report.md and the plots into a local directory; returns the markdown."""
    on_gpu = summary.get("device_type", cfg.device_type) == "cuda"
    setup = {
        "Run name": cfg.run_name,
        "Number of parameters": plan.num_params,
        "Number of scaling parameters": plan.num_scaling_params,
        "Number of FLOPs per token": f"{plan.num_flops_per_token:e}",
        "Calculated number of iterations": plan.num_iterations,
        "Number of training tokens": plan.total_tokens,
        "Tokens : Scaling params ratio": plan.total_tokens / plan.num_scaling_params,
        "DDP world size": plan.world_size,
        "Gradient accumulation steps": plan.grad_accum_steps,
        "Attention": summary.get("attention"),
        "Recipe": cfg.recipe, "Total batch size": plan.total_batch_size,
        "warmup_ratio": cfg.warmup_ratio, "warmup_steps": cfg.warmup_steps, "warmdown_ratio": cfg.warmdown_ratio,
        "final_lr_frac": cfg.final_lr_frac,
    }
    outcomes = {
        "Minimum validation bpb": None if summary["val_bpb"] is None else summary["min_val_bpb"],
        "Final validation bpb": summary["val_bpb"],
        "CORE metric estimate": summary["core_metric"],
        # CPUs have no peak-FLOPs figure to divide by (common.get_peak_flops): an MFU would read 0.00%.
        "MFU %": f"{summary['mfu']:.2f}%" if on_gpu else "n/a (CPU)",
        "Total training flops": f"{summary['total_training_flops']:e}",
        "Total training time": f"{summary['total_training_time'] / 60:.2f}m",
        ("Peak memory usage" if on_gpu else "Peak memory usage (host RSS, rank 0)"):
            f"{summary['peak_memory_mib']:.2f}MiB",
        # Training waiting for batches (rank 0, steps after 10): a stall shows here, not only as a lower MFU.
        "Data wait per step": None if not (wait := summary.get("data_wait")) else
            f"{wait['per_step_s'] * 1000:.2f}ms ({100 * wait['share']:.2f}% of step time)",
    }
    resizes = {f"step {r['step']}": f"{r['from']} -> {r['to']} workers"
               + ("" if r.get("lost_s") is None else f", {r['lost_s']:.1f}s since the checkpoint resumed from")
               for r in summary.get("resizes") or []}
    changes = {f"step {c['step']}": describe_changes(c["changed"]) for c in summary.get("setting_changes") or []}
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    md = [f"## Base model training: {cfg.run_name}",
          f"timestamp: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}", "",
          _section("Config", _config_items(cfg)), _section("Parameter counts", plan.param_counts),
          _section("Setup", setup), _section("Outcomes", outcomes),
          *([_section("Resizes (world size changes)", resizes)] if resizes else []),
          *([_section("Changed settings (--allow-changed)", changes)] if changes else []), _section("Environment", env)]
    plt = pyplot()
    if plt is None:
        md.append("Plots skipped: matplotlib is not installed (`pip install matplotlib`).\n")
    else:
        if _plot(plt, history["train_loss"], "train loss (smoothed, debiased)",
                 os.path.join(out_dir, "train_loss.png"), f"{cfg.run_name}: train loss"):
            md.append("![train loss](train_loss.png)\n")
        if _plot(plt, history["val_bpb"], "val bpb", os.path.join(out_dir, "val_bpb.png"),
                 f"{cfg.run_name}: val bpb", mark_points=True):
            md.append("![val bpb](val_bpb.png)\n")
    text = "\n".join(md)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def write_run_report(cfg, plan, summary: dict, history: dict) -> str:
    """Render the report and copy it into `{storage_path}/{run_name}/` (local, s3:// or gs://)."""
    dest = run_dir(cfg)
    tmp = tempfile.mkdtemp(prefix="raychat-report-")
    try:
        render_report(cfg, plan, summary, history, tmp)
        storage.copy_into(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"{dest}/report.md"


EVAL_BEGIN, EVAL_END = "<!-- raychat.eval -->", "<!-- /raychat.eval -->"


def add_evaluation(report_path: str, eval_md: str) -> bool:
    """Put `python -m raychat.eval`'s results (eval.md: CORE, bpb, samples) into the run's report.md, replacing
    an earlier evaluation's, so the report holds the whole run. False when the run has no report yet."""
    if not os.path.isfile(report_path):
        return False
    with open(report_path) as f:
        text = f.read()
    if EVAL_BEGIN in text and EVAL_END in text:
        text = text[:text.index(EVAL_BEGIN)] + text[text.index(EVAL_END) + len(EVAL_END):].lstrip("\n")
    text = text.rstrip("\n") + f"\n\n{EVAL_BEGIN}\n{eval_md.rstrip()}\n{EVAL_END}\n"
    with open(report_path + ".tmp", "w") as f:
        f.write(text)
    os.replace(report_path + ".tmp", report_path)  # whole files only, as the report's own writer
    return True
