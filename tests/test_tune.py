"""Sweeps on Ray Tune (raychat.tune, raychat.sweep_config): validation of sweep files, the shipped configs,
a real 4-trial ASHA sweep of tiny models, and killing a sweep's driver then resuming it."""
import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import reap_ray

from raychat.config import parse_args
from raychat.sweep_config import SweepConfigError, check_cluster, check_plan, load_sweep, parse_sweep

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CPU_SMOKE = os.path.join(REPO, "tune_configs", "cpu_smoke.yaml")
SHIPPED = ["cpu_smoke.yaml", "d12_lr_wd.yaml", "d20_lr_wd.yaml"]

GOOD = """\
train:
  depth: 2
  num_iterations: 16
  eval_every: 4
search_space:
  matrix_lr: {loguniform: [0.001, 0.05]}
scheduler: {type: asha, grace_period: 4}
"""


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    """Default paths (<base>/sweeps, <base>/tokenizer) land in the test's own directory."""
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(tmp_path / "base"))


def write(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------------------------------
# Validation: each bad file names its line and key


BAD = [
    # (what replaces GOOD's text, old -> new), the expected fragments of the error
    (("scheduler:", "num_smaples: 3\nscheduler:"), ["sweep.yaml:7", "num_smaples", "unknown key"]),
    (("  depth: 2", "  depht: 2"), ["sweep.yaml:2", "train.depht", "unknown training flag"]),
    (("  matrix_lr: {", "  matrix_rl: {"), ["sweep.yaml:6", "search_space.matrix_rl", "unknown training flag"]),
    (("loguniform: [0.001", "logunifrom: [0.001"), ["sweep.yaml:6", "search_space.matrix_lr",
                                                     "unknown distribution 'logunifrom'"]),
    (("[0.001, 0.05]", "[0.0, 0.05]"), ["search_space.matrix_lr", "low > 0"]),
    (("{loguniform: [0.001, 0.05]}", "{uniform: [0.05, 0.01]}"), ["search_space.matrix_lr", "low < high"]),
    (("matrix_lr: {loguniform: [0.001, 0.05]}", "head_dim: {loguniform: [16, 64]}"),
     ["search_space.head_dim", "not a float flag"]),
    (("matrix_lr: {loguniform: [0.001, 0.05]}", "weight_decay: {uniform: [-1.0, 0.2]}"),
     ["search_space.weight_decay", "finite number >= 0"]),
    (("matrix_lr: {loguniform: [0.001, 0.05]}", "matrix_lr: {choice: []}"), ["search_space.matrix_lr", "non-empty"]),
    (("  depth: 2", "  depth: 2\n  num_workers: 4"), ["sweep.yaml:3", "train.num_workers", "resources.workers"]),
    (("  depth: 2", "  depth: two"), ["sweep.yaml:2", "train.depth", "must be an integer"]),
    (("  eval_every: 4", "  eval_every: -1"), ["train.eval_every", "must be > 0"]),
    (("scheduler: {type: asha, grace_period: 4}", "scheduler: {type: asha}"), ["sweep.yaml:7", "grace_period"]),
    (("scheduler:", "resources: {workers: 0}\nscheduler:"), ["sweep.yaml:7", "resources.workers", ">= 1"]),
    (("scheduler:", "resources: {gpus_per_worker: 2}\nscheduler:"), ["resources.gpus_per_worker", "0 (CPU"]),
    (("scheduler:", "resources: {cpus: 2}\nscheduler:"), ["resources.cpus", "unknown key"]),
    (("scheduler:", "search_alg: grid\nscheduler:"), ["search_space.matrix_lr", "grid needs listed values"]),
    (("scheduler:", "search_alg: hyperopt\nscheduler:"), ["search_alg", "random, grid, optuna"]),
]


@pytest.mark.parametrize("edit,fragments", BAD, ids=[b[1][1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_sweep_files_name_line_and_key(tmp_path, edit, fragments):
    old, new = edit
    assert old in GOOD
    with pytest.raises(SweepConfigError) as e:
        load_sweep(write(tmp_path, GOOD.replace(old, new, 1)))
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in: {e.value}"


def test_good_file_resolves(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD))
    assert sweep.name == "sweep" and sweep.sweep_dir == str(tmp_path / "base" / "sweeps" / "sweep")
    assert sweep.search_space == {"matrix_lr": ("loguniform", [0.001, 0.05])}
    cfg = sweep.trial_config({"matrix_lr": 0.01}, "abc_00001")
    assert (cfg.run_name, cfg.storage_path, cfg.matrix_lr, cfg.depth) == (
        "sweep-abc_00001", sweep.runs_dir, 0.01, 2)
    assert cfg.use_gpu == "false" and cfg.num_workers == 1
    # One CPU worker: the trial's own process trains, tokenizing inline (`auto` without a Train job).
    assert sweep.in_process and sweep.per_trial_resources() == {"CPU": 1.0, "GPU": 0}
    assert sweep.trial_process_resources() == {"CPU": 1.0}
    two = load_sweep(write(tmp_path, GOOD.replace("scheduler:", "resources: {workers: 2}\nscheduler:")))
    assert not two.in_process and two.per_trial_resources() == {"CPU": 5.0, "GPU": 0}  # driver + 2 x (worker + actor)
    assert two.trial_process_resources() == {"CPU": 1.0}  # the Train job's driver


def test_plan_and_cluster_checks(tmp_path):
    sweep = load_sweep(write(tmp_path, GOOD.replace("grace_period: 4", "grace_period: 16")))
    with pytest.raises(SweepConfigError, match=r"sweep.yaml:7: scheduler.grace_period: 16 must be below"):
        check_plan(sweep, 512)
    sweep = load_sweep(write(tmp_path, GOOD.replace("scheduler:", "resources: {workers: 2, gpus_per_worker: 1}\n"
                                                                  "scheduler:")))
    assert check_plan(sweep, 512).num_iterations == 16
    with pytest.raises(SweepConfigError, match=r"resources.gpus_per_worker: one trial needs 2 GPUs .* has 1"):
        check_cluster(sweep, {"CPU": 64, "GPU": 1})
    with pytest.raises(SweepConfigError, match=r"resources.workers: one trial needs 5 CPUs .* has 4"):
        check_cluster(sweep, {"CPU": 4, "GPU": 8})
    check_cluster(sweep, {"CPU": 5, "GPU": 2})


def test_overrides_and_grid_count(tmp_path):
    sweep = parse_sweep({"train": {"num_iterations": 8, "eval_every": 2},
                         "search_space": {"matrix_lr": {"grid": [0.01, 0.02, 0.04]}, "window_pattern": {"choice": ["L", "SL"]}},
                         "scheduler": {"type": "fifo"}},
                        "inline.yaml", overrides={"num_samples": 2, "train.depth": 4})
    assert sweep.num_samples == 2 and sweep.train["depth"] == 4
    assert sweep.num_trials() == 6  # 3 grid points x 2 samples of the choice


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_dry_run(name, tiny_data_dir, tiny_tokenizer_dir, capsys):
    from raychat.tune import main

    # A dry run checks the trials' shards and tokenizer too: point it at real (tiny) ones.
    assert main([os.path.join(REPO, "tune_configs", name), "--dry-run", "--set", f"train.data_dir={tiny_data_dir}",
                 "--set", f"train.tokenizer_dir={tiny_tokenizer_dir}"]) == 0
    out = capsys.readouterr().out
    assert f"Sweep {name[:-5]}:" in out and "python -m raychat.train" in out
    with open(os.path.join(REPO, "tune_configs", name)) as f:
        assert "Expected cost" in f.read(1500), "each shipped sweep states its cost at the top"


def test_cli_reports_errors_with_exit_2(tmp_path, capsys):
    from raychat.tune import main

    assert main([write(tmp_path, GOOD.replace("  depth: 2", "  depht: 2")), "--dry-run"]) == 2
    assert "train.depht" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Real sweeps (real Ray, tiny models, tinyshakespeare)


def smoke_overrides(data_dir, tok_dir, storage):
    return {"train.data_dir": data_dir, "train.tokenizer_dir": tok_dir, "storage_path": storage}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_sweep_asha_outputs_best(ray_local, tiny_data_dir, tiny_tokenizer_dir, tmp_path):
    from raychat.tune import run_sweep

    # One trial at a time: which trials ASHA stops then depends only on their (deterministic) val bpb, not on
    # which of two concurrent trials reaches a rung first.
    overrides = {**smoke_overrides(tiny_data_dir, tiny_tokenizer_dir, str(tmp_path / "sweeps")),
                 "max_concurrent_trials": 1}
    sweep = load_sweep(CPU_SMOKE, overrides)
    rows, command = run_sweep(sweep)

    assert len(rows) == 4 and len({r.trial for r in rows}) == 4
    assert all(r.status in ("done", "stopped early") for r in rows), [(r.trial, r.status) for r in rows]
    assert any(r.stopped_early for r in rows), "ASHA stopped no trial"
    assert any(r.status == "done" and r.steps == 16 for r in rows)

    table = read_csv(os.path.join(sweep.sweep_dir, "results.csv"))
    assert len(table) == 4
    best = min(table, key=lambda r: float(r["min_val_bpb"]))
    md = open(os.path.join(sweep.sweep_dir, "results.md")).read()
    assert f"| {best['trial']} **(best)** |" in md and md.count("**(best)**") == 1
    for row in table:  # the early-stopped trials really stopped: their Train runs end before step 16
        last = int(row["steps"])
        assert (row["stopped_early"] == "True") == (last < 16)
        assert os.path.isdir(row["run_dir"])

    # The printed command parses as raychat.train flags and carries the best trial's sampled values.
    assert open(os.path.join(sweep.sweep_dir, "best_command.txt")).read().strip() == command
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "raychat.train"]
    cfg = parse_args(argv[3:])
    for flag in sweep.search_space:
        assert getattr(cfg, flag) == pytest.approx(float(best[flag]), rel=1e-12)
    assert cfg.depth == 2 and cfg.num_iterations == 16 and cfg.data_dir == tiny_data_dir

    for flag in sweep.search_space:
        with open(os.path.join(sweep.sweep_dir, "plots", f"val_bpb_vs_{flag}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sweep_env():
    """The environment of a sweep run as its own process, which starts (and, killed, leaves) its own local Ray."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # Its own Ray temp dir, apart from the session's; short, as Ray's socket paths under it must stay < 108 bytes.
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"  # Tune saves its experiment state often, so a kill loses little
    env["PYTHONPATH"] = REPO
    yield env
    reap_ray(env["RAY_TMPDIR"], timeout=0)  # a SIGKILLed sweep may leave its Ray
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def _log_events(sweep_dir):
    path = os.path.join(sweep_dir, "trial_log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _snapshot(run_dir):
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, run_dir)] = os.stat(p).st_mtime_ns
    return out


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_data_dir, tiny_tokenizer_dir, tmp_path, sweep_env):
    storage = str(tmp_path / "sweeps")
    args = [sys.executable, "-m", "raychat.tune", CPU_SMOKE, "--name", "killed", "--storage-path", storage,
            "--set", f"train.data_dir={tiny_data_dir}", "--set", f"train.tokenizer_dir={tiny_tokenizer_dir}",
            "--set", "num_samples=2", "--set", "max_concurrent_trials=1", "--set", "scheduler={type: fifo}"]
    sweep_dir = os.path.join(storage, "killed")
    env = sweep_env
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(e["event"] == "complete" for e in _log_events(sweep_dir)):
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"the sweep ended before it could be killed: {open(tmp_path / 'first.log').read()[-3000:]}"
        time.sleep(3)  # > TUNE_GLOBAL_CHECKPOINT_S: Tune has written the finished trial into its state
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        reap_ray(env["RAY_TMPDIR"], timeout=0)  # a SIGKILLed sweep may leave its Ray
        log.close()

    finished = [e["trial"] for e in _log_events(sweep_dir) if e["event"] == "complete"]
    assert len(finished) == 1
    assert not os.path.exists(os.path.join(sweep_dir, "results.csv"))
    before = {t: _snapshot(os.path.join(sweep_dir, "runs", f"killed-{t}")) for t in finished}

    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    events = _log_events(sweep_dir)
    for t in finished:  # no second start, and its Train run untouched
        assert [e["event"] for e in events if e["trial"] == t] == ["start", "complete"]
        assert _snapshot(os.path.join(sweep_dir, "runs", f"killed-{t}")) == before[t]
    table = read_csv(os.path.join(sweep_dir, "results.csv"))
    assert sorted(r["trial"] for r in table) == sorted({e["trial"] for e in events})
    assert len(table) == 2 and all(r["status"] == "done" and r["steps"] == "16" for r in table)
