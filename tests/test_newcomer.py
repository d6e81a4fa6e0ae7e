"""A newcomer's first hour: the dry run names what is missing, eval finds (or names) the run, the report is
whole, the numbers agree, --help reads as the command to type, and nothing lands outside tmp."""
import json
import os
import shutil
import sys

import pytest

from conftest import REPO_ROOT, STEPS, tiny_args
from raychat.eval import main as eval_main
from raychat.export import main as export_main
from raychat.train import main as train_main

sys.path.insert(0, REPO_ROOT)  # `python -m scripts.tok_train` runs from the checkout (see test_tokenizer.py)


@pytest.fixture
def empty_base(tmp_path, monkeypatch):
    """RAYCHAT_BASE_DIR pointing at a directory that does not exist yet: a fresh machine."""
    base = tmp_path / "fresh"
    monkeypatch.setenv("RAYCHAT_BASE_DIR", str(base))
    return base


# ---- the dry run is the launch's preflight --------------------------------------------------------------


def test_dry_run_on_an_empty_base_dir_lists_everything_missing_and_writes_nothing(empty_base, capsys):
    assert train_main(["--depth", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err
    assert f"{empty_base}/tokenizer/tokenizer.pkl is missing" in err
    assert f"data directory {empty_base}/base_data does not exist" in err
    assert not empty_base.exists(), "a dry run must leave the disk as it found it"


def test_tune_dry_run_checks_the_trials_inputs(empty_base, capsys):
    from raychat.tune import main as tune_main

    assert tune_main([os.path.join(REPO_ROOT, "tune_configs", "cpu_smoke.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.pkl is missing" in err and "base_data does not exist" in err
    assert not empty_base.exists()


def test_dry_run_passes_on_real_data_and_checks_the_slots(tiny_data_dir, tiny_tokenizer_dir, tmp_path, capsys):
    storage = str(tmp_path / "runs")
    assert train_main([*tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "dry"), "--dry-run"]) == 0
    assert "Dry run: flags, tokenizer, shards, data slots" in capsys.readouterr().out
    # 64 micro-batches of one row each need 64 slots; the tiny shards have far fewer row groups per file.
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "dry", "--device-batch-size", "1",
                     "--total-batch-size", "4096")
    assert train_main([*args, "--dry-run"]) == 2
    assert "fewer than the 64 data slots" in capsys.readouterr().err
    assert not os.path.exists(storage)


def test_dry_run_checks_the_checkpoint_a_rerun_would_resume(local_baseline, tiny_data_dir, tiny_tokenizer_dir,
                                                            storage, capsys):
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "local-baseline", "--num-workers", "2")
    assert train_main([*args, "--dry-run"]) == 0
    assert train_main([*args, "--depth", "3", "--dry-run"]) == 2
    assert "another model" in capsys.readouterr().err


def test_a_dry_run_makes_no_directory_in_the_working_directory(tmp_path, monkeypatch):
    """The quickstart's commands name a relative base dir (the documented-command check runs them)."""
    from raychat.data.__main__ import main as data_main
    from scripts.tok_train import main as tok_main

    monkeypatch.chdir(tmp_path)
    assert data_main(["prepare", "--from", "stdlib", "--out", "example/base_data", "--base-dir", "example",
                      "--dry-run"]) == 0
    assert tok_main(["--base-dir", "example", "--dry-run"]) == 0
    assert train_main(["--base-dir", "example", "--dry-run"]) == 2
    assert eval_main(["--base-dir", "example", "--run-name", "r", "--dry-run"]) == 0
    assert os.listdir(tmp_path) == []


# ---- eval and export name the run they cannot find ------------------------------------------------------


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_run_under_another_base_dir_is_named_with_the_runs_found(command, empty_base, tmp_path, capsys):
    (empty_base / "runs" / "d4-other").mkdir(parents=True)
    if command == "eval":
        code = eval_main(["--run-name", "quickstart-d4", "--eval", "bpb"])
    else:
        code = export_main(["--run-name", "quickstart-d4", "--to-nanochat", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"no run named quickstart-d4 under {empty_base}/runs (the runs there: d4-other)" in err
    assert "--base-dir" in err


def test_the_quickstart_prints_the_eval_and_export_commands_of_its_run():
    with open(os.path.join(REPO_ROOT, "scripts", "quickstart.sh")) as f:
        script = f.read()
    assert 'EVAL=(python -m raychat.eval --base-dir "$BASE" --run-name "$RUN_NAME"' in script
    assert 'EXPORT=(python -m raychat.export --base-dir "$BASE" --run-name "$RUN_NAME"' in script
    assert 'echo "Evaluate it again:       ${EVAL[*]}"' in script and "${EXPORT[*]}" in script


# ---- the report -----------------------------------------------------------------------------------------


def _render(tmp_path, **summary_overrides):
    from raychat.config import TrainConfig, derive
    from raychat.report import render_report

    cfg = TrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, device_batch_size=4,
                      total_batch_size=512, num_iterations=4, run_name="newcomer", device_type="cpu")
    plan = derive(cfg, 512, 1)
    summary = {"val_bpb": 2.5, "min_val_bpb": 2.5, "core_metric": None, "mfu": 0.0, "device_type": "cpu",
               "total_training_flops": 1e9, "total_training_time": 60.0, "peak_memory_mib": 512.0,
               **summary_overrides}
    history = {"train_loss": [[0, 6.0], [1, 5.0]], "val_bpb": [[0, 3.0], [4, 2.5]], "core_metric": []}
    out = tmp_path / "report"
    out.mkdir()
    return render_report(cfg, plan, summary, history, str(out)), out


def test_report_on_cpu_shows_host_memory_no_mfu_and_wandb_off(tmp_path):
    text, out = _render(tmp_path)
    assert "- wandb: off" in text and "- run: dummy" not in text
    assert "- MFU %: n/a (CPU)" in text and "0.00%" not in text
    assert "- Peak memory usage (host RSS, rank 0): 512.00MiB" in text
    assert (out / "train_loss.png").stat().st_size > 0 and (out / "val_bpb.png").stat().st_size > 0
    (tmp_path / "gpu").mkdir()
    gpu, _ = _render(tmp_path / "gpu", device_type="cuda", mfu=41.5)
    assert "- MFU %: 41.50%" in gpu and "- Peak memory usage: 512.00MiB" in gpu


def test_report_takes_the_evaluation_and_replaces_an_earlier_one(tmp_path):
    from raychat.report import add_evaluation

    _, out = _render(tmp_path)
    report = str(out / "report.md")
    assert add_evaluation(report, "## Base model evaluation: A\n\n- val bpb: 2.000000\n")
    assert add_evaluation(report, "## Base model evaluation: B\n\n### Samples\n\n```\nhello\n```\n")
    text = open(report).read()
    assert "## Base model training: newcomer" in text and "### Outcomes" in text
    assert "evaluation: A" not in text and "evaluation: B" in text and "### Samples" in text
    assert not add_evaluation(str(tmp_path / "no-run" / "report.md"), "x")


def test_eval_reproduces_the_runs_val_bpb_and_fills_its_report(local_baseline, tiny_data_dir, tiny_tokenizer_dir,
                                                               tmp_path):
    """The same checkpoint and token count give the same val bpb in training and in raychat.eval (the batch
    layout follows the run's), and the run's report gains the evaluation and its samples."""
    storage = str(tmp_path / "runs")
    shutil.copytree(local_baseline, os.path.join(storage, "baseline"))  # the shared baseline stays untouched
    assert eval_main(["--run-name", "baseline", "--storage-path", storage, "--eval", "bpb,sample",
                      "--data-dir", tiny_data_dir, "--tokenizer-dir", tiny_tokenizer_dir,
                      "--split-tokens", "1024"]) == 0  # the run's --eval-tokens; its device batch size by default
    step_dir = os.path.join(storage, "baseline", f"step_{STEPS:06d}")
    with open(os.path.join(step_dir, "eval.json")) as f, open(os.path.join(step_dir, "meta.json")) as g:
        assert json.load(f)["bpb"]["val"] == json.load(g)["val_bpb"]
    report = open(os.path.join(storage, "baseline", "report.md")).read()
    assert "## Base model evaluation" in report and "- val bpb:" in report and "### Samples" in report


# ---- --help ---------------------------------------------------------------------------------------------


def _help(module_args, capsys):
    import runpy
    import warnings

    module, *args = module_args
    argv = sys.argv
    sys.argv = [module, *args, "--help"]
    try:
        # runpy warns that the module is already imported (by this test file): harmless for --help.
        with pytest.raises(SystemExit), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [["raychat.train"], ["raychat.eval"], ["raychat.export"], ["raychat.tune"],
                                     ["raychat.data", "download"], ["raychat.data", "prepare"],
                                     ["scripts.tok_train"]], ids=" ".join)
def test_help_reads_as_the_command_with_each_default_once(command, capsys):
    text = _help(command, capsys)
    assert text.startswith(f"usage: python -m {' '.join(command)} "), text.splitlines()[0]
    options = " ".join(text.split()).split("options:")[1]
    assert "(default: None)" not in options and "(default: False)" not in options
    # Every option has help text: argparse then puts text after the option (or on the next line).
    lines = text.split("options:")[1].splitlines()[1:]
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("-") and "  " not in stripped and not stripped.startswith("-h"):
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert following and not following.startswith("-"), f"{stripped} has no help text"
    for entry in options.split(" --"):
        assert entry.count("(default") <= 1, f"a default shown twice: --{entry}"
