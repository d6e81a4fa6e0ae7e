"""The training loop's semantics, run in this process without Ray (raychat.loop.train on a LocalSession): the
tiny run of conftest.py, its checkpoints in `{storage}/{run_name}/step_XXXXXX/` as under Ray.

Every resumed run is compared tensor for tensor with the uninterrupted one (`local_baseline`). What needs Ray
itself (automatic restarts, the driver, elastic resizing, several nodes) is in test_reliability.py,
test_train.py and test_elastic.py.
"""
import gc
import os
import shutil
import subprocess
import types

import pytest
import torch

from conftest import STEPS, assert_same_run, final_state, flip_bytes, load_step, tiny_config, train_local, tree_hashes
from raychat import checkpoint as ckpt_files
from raychat import faults
from raychat.runs import read_stop


@pytest.fixture
def config(tiny_data_dir, tiny_tokenizer_dir, storage):
    """config(name, *flags): the tiny run's TrainConfig under the shared storage."""
    return lambda name, *extra: tiny_config(tiny_data_dir, tiny_tokenizer_dir, storage, name, *extra)


def _steps(run):
    return [s for s, _ in ckpt_files.list_step_dirs(run)]


def _copy_steps(src_run, dst_run, steps):
    os.makedirs(dst_run)
    for step in steps:
        name = ckpt_files.step_dir_name(step)
        shutil.copytree(os.path.join(src_run, name), os.path.join(dst_run, name))


def test_uninterrupted_run_checkpoints_evaluates_and_reports(local_baseline):
    state, meta = final_state(local_baseline)
    assert meta["world_size"] == 1 and meta["grad_accum_steps"] == 2 and meta["num_slots"] == 2
    assert _steps(local_baseline) == [4, 8, 12, 16]
    assert [s for s, _ in meta["history"]["val_bpb"]] == [0, 8, 16]
    val = [v for _, v in meta["history"]["val_bpb"]]
    assert val[-1] < val[0], f"val bpb did not fall: {val}"
    assert [s for s, _ in meta["history"]["train_loss"]] == list(range(STEPS))
    assert all(torch.isfinite(v).all() for v in state.values())
    report = open(os.path.join(local_baseline, "report.md")).read()
    assert "Minimum validation bpb" in report and "Number of parameters" in report
    for png in ("train_loss.png", "val_bpb.png"):
        with open(os.path.join(local_baseline, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_same_config_twice_gives_the_same_losses_and_weights(local_baseline, config):
    """Nothing in a run depends on anything but its config: a second run is bit-identical to the first,
    at every checkpoint, in the train losses and the validation bpb."""
    summary, session = train_local(config("again"))
    run = os.path.join(os.path.dirname(local_baseline), "again")
    for step in (4, 8, 12, STEPS):
        assert_same_run(run, local_baseline, step)
    _, ref_meta = load_step(local_baseline, STEPS)
    assert summary["val_bpb"] == ref_meta["val_bpb"]
    assert [r["step"] for r in session.reports] == [0, 4, 8, 12, 16]  # evaluations and checkpoints


# ----------------------------------------------------------------------------------------------------
# A non-finite loss


def test_nan_stops_naming_the_step_and_keeps_the_last_checkpoint(local_baseline, config):
    """Step 10's first micro-batch loss becomes NaN: the run stops at step 10 with a reason naming it, written
    for the driver (stopped.json); the step-8 checkpoint equals the uninterrupted run's, and a rerun without
    the fault resumes from it, leaves it untouched and ends bit-identical."""
    cfg = config("nanstop", "--debug-fail-at-step", "10", "--debug-fail-kind", "nan")
    summary, session = train_local(cfg)
    assert summary["stopped"].startswith("loss became non-finite at step 10"), summary["stopped"]
    assert summary["step"] == 10
    assert session.reports[-1] == {"step": 10, "stopped": summary["stopped"]}
    assert read_stop(cfg) == summary["stopped"]
    run = os.path.join(cfg.storage_path, "nanstop")
    assert _steps(run) == [4, 8]
    assert not os.path.exists(os.path.join(run, "report.md"))
    assert_same_run(run, local_baseline, 8)

    before = tree_hashes(os.path.join(run, "step_000008"))
    read_stop(cfg, remove=True)  # what the driver does on a rerun
    summary, _ = train_local(config("nanstop"))
    assert summary["stopped"] is None and read_stop(cfg) is None
    assert tree_hashes(os.path.join(run, "step_000008")) == before
    assert_same_run(run, local_baseline)


def test_nan_skipped_with_the_flag(local_baseline, config):
    """--nan-policy skip: step 10's update is dropped and the run finishes with finite weights; they differ from
    the uninterrupted run's only because that one update is missing."""
    summary, _ = train_local(config("nanskip", "--nan-policy", "skip", "--debug-fail-at-step", "10",
                                    "--debug-fail-kind", "nan"))
    assert summary["stopped"] is None
    run = os.path.join(os.path.dirname(local_baseline), "nanskip")
    assert_same_run(run, local_baseline, 8)
    state, meta = load_step(run, STEPS)
    ref, _ = load_step(local_baseline, STEPS)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[k], ref[k]) for k in ref), "step 10's update was not skipped"
    losses = [v for _, v in meta["history"]["train_loss"]]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_nan_in_a_later_micro_batch_poisons_the_step(local_baseline, config, monkeypatch):
    """Any micro-batch's non-finite loss counts, not only the first's: the second of step 6's two micro-batches
    (the gradient is already half accumulated) stops the run at step 6, before its update."""
    def loss(self, loss, step, micro_step):
        return loss * float("nan") if (step, micro_step) == (6, 1) else loss

    monkeypatch.setattr(faults.FaultInjector, "loss", loss)
    summary, _ = train_local(config("nanmicro"))
    assert summary["stopped"].startswith("loss became non-finite at step 6"), summary["stopped"]
    run = os.path.join(os.path.dirname(local_baseline), "nanmicro")
    assert _steps(run) == [4]
    assert_same_run(run, local_baseline, 4)


# ----------------------------------------------------------------------------------------------------
# Resuming


def test_resume_from_step_resumes_exactly(local_baseline, config, capfd):
    """--resume-from-step 8 with a newer checkpoint (12) present: the run continues from 8, not the newest, and
    ends bit-identical."""
    cfg = config("fromstep", "--resume-from-step", "8")
    run = os.path.join(cfg.storage_path, "fromstep")
    _copy_steps(local_baseline, run, (8, 12))
    summary, _ = train_local(cfg)
    assert "Resuming from step 8" in capfd.readouterr().out
    assert summary["step"] == STEPS
    for step in (12, STEPS):
        assert_same_run(run, local_baseline, step)


def test_rerun_resumes_the_newest_checkpoint(local_baseline, config, monkeypatch, capfd):
    """A run that dies at step 10 (the `exit` fault, made an exception here instead of the process's end), then
    the same config again: it resumes from its newest checkpoint and ends bit-identical. The fault fires once
    per run (its marker file), so the rerun, with the same flags, trains through step 10."""
    class Died(Exception):
        pass

    def die(code):
        raise Died(code)

    monkeypatch.setattr(faults, "os", types.SimpleNamespace(path=os.path, _exit=die, kill=os.kill, getpid=os.getpid))
    cfg = config("rerun", "--debug-fail-at-step", "10", "--debug-fail-kind", "exit")
    with pytest.raises(Died):
        train_local(cfg)
    gc.unfreeze()  # the loop froze and disabled the collector after its first step; a real exit ends the process
    gc.enable()
    run = os.path.join(cfg.storage_path, "rerun")
    assert os.path.exists(os.path.join(run, ".injected_failure_step10"))
    newest = max(_steps(run))
    assert newest < STEPS
    capfd.readouterr()
    summary, _ = train_local(cfg)
    assert f"Resuming from step {newest}" in capfd.readouterr().out
    assert summary["stopped"] is None
    assert_same_run(run, local_baseline)


def test_incomplete_latest_checkpoints_are_skipped(local_baseline, config, capfd):
    """A rerun of a run whose newest checkpoint lost a file and whose previous one was truncated resumes from
    the one before them, warns about both, and ends bit-identical."""
    cfg = config("damaged")
    run = os.path.join(cfg.storage_path, "damaged")
    _copy_steps(local_baseline, run, (4, 8, 12))
    os.remove(os.path.join(run, "step_000012", "data_rank0.json"))
    with open(os.path.join(run, "step_000008", "model.pt"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    train_local(cfg)
    text = "".join(capfd.readouterr())
    assert "skipping incomplete checkpoint" in text and "step_000012" in text and "step_000008" in text
    assert "data_rank0.json is missing" in text and "truncated" in text
    assert "Resuming from step 4" in text
    assert_same_run(run, local_baseline)


def test_corrupt_latest_checkpoint_is_skipped(local_baseline, config, capfd):
    """8 bytes flipped in the middle of the newest checkpoint's optim_rank0.pt (the size is unchanged and
    torch.load would read it): a rerun warns naming the file, resumes from the previous checkpoint and ends
    bit-identical."""
    cfg = config("bitrot")
    run = os.path.join(cfg.storage_path, "bitrot")
    _copy_steps(local_baseline, run, (4, 8))
    flip_bytes(os.path.join(run, "step_000008", "optim_rank0.pt"))
    torch.load(os.path.join(run, "step_000008", "optim_rank0.pt"), weights_only=True)  # still loads: silent rot
    train_local(cfg)
    text = "".join(capfd.readouterr())
    assert "skipping incomplete checkpoint" in text
    assert "step_000008/optim_rank0.pt does not match its checksum" in text
    assert "Resuming from step 4" in text
    assert_same_run(run, local_baseline)


def test_changed_settings_refused_unless_allowed_then_recorded(local_baseline, config, capsys):
    """The finished 16-step run resumed with --matrix-lr 0.05 --num-iterations 20: the driver's preflight refuses
    it (both changes named, nothing written); with --allow-changed it trains on to step 20 and the change, with
    the step it took effect, is in meta.json and report.md."""
    from raychat.train import PreflightError, preflight

    changed = ("--matrix-lr", "0.05", "--num-iterations", "20")
    cfg = config("changed", *changed)
    run = os.path.join(cfg.storage_path, "changed")
    _copy_steps(local_baseline, run, (STEPS,))
    before = tree_hashes(run)
    with pytest.raises(PreflightError) as refused:
        preflight(cfg)
    assert f"--num-iterations {STEPS} -> 20, --matrix-lr 0.02 -> 0.05" in str(refused.value)
    assert "--allow-changed num_iterations,matrix_lr" in str(refused.value)
    assert tree_hashes(run) == before

    cfg = config("changed", *changed, "--allow-changed", "num_iterations,matrix_lr")
    preflight(cfg)
    assert "Changed settings from step 16 on (--allow-changed)" in capsys.readouterr().out
    summary, _ = train_local(cfg)
    expected = [{"step": STEPS, "changed": {"num_iterations": [STEPS, 20], "matrix_lr": [0.02, 0.05]}}]
    assert summary["step"] == 20 and summary["setting_changes"] == expected
    _, meta = load_step(run, 20)
    assert meta["setting_changes"] == expected
    assert meta["user_config"]["matrix_lr"] == 0.05
    report = open(os.path.join(run, "report.md")).read()
    assert f"step {STEPS}: --num-iterations {STEPS} -> 20, --matrix-lr 0.02 -> 0.05" in report


def _mount_tmpfs(path, size_bytes):
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes // 1024}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


def test_full_storage_stops_with_one_clear_error(local_baseline, tiny_data_dir, tiny_tokenizer_dir, tmp_path):
    """Storage on a real tmpfs with room for two checkpoints and a half: the step-12 save fails with ENOSPC. The
    loop returns (no exception, so Ray Train would not restart it into the same full disk) with one reason naming
    the storage path, what the checkpoint needed and what is free; steps 4 and 8 stay complete, and no
    step_000012 directory is left behind."""
    step4 = os.path.join(local_baseline, "step_000004")
    step_bytes = sum(os.path.getsize(os.path.join(step4, f)) for f in os.listdir(step4))
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, int(2.5 * step_bytes))
    try:
        cfg = tiny_config(tiny_data_dir, tiny_tokenizer_dir, str(mnt), "full")
        summary, _ = train_local(cfg)
        run = os.path.join(mnt, "full")
        reason = summary["stopped"]
        assert reason.startswith(f"the checkpoint of step 12 could not be saved to {run}: No space left on device; "
                                 "it needs"), reason
        assert "MiB are free there" in reason and "the older checkpoints are intact" in reason
        assert read_stop(cfg) == reason
        assert _steps(run) == [4, 8]
        for step in (4, 8):
            assert_same_run(run, local_baseline, step)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------------------------------
# Two ranks without Ray (gloo processes)


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank(local_baseline, config):
    """2 gloo ranks, step 10's loss NaN on rank 1 only: both ranks agree and stop at step 10 with the same
    reason, and the step-8 checkpoint (both ranks' files) equals the 1-worker run's to fp32 summation order (1
    worker x 2 micro-batches and 2 workers x 1 train on the same batches, docs/ARCHITECTURE.md "slots")."""
    from conftest import train_gloo

    cfg = config("gloo-nan", "--num-workers", "2", "--debug-fail-at-step", "10", "--debug-fail-kind", "nan", "--debug-fail-rank", "1")
    summaries = train_gloo(cfg)
    assert [s["step"] for s in summaries] == [10, 10]
    assert summaries[0]["stopped"] == summaries[1]["stopped"]
    assert summaries[0]["stopped"].startswith("loss became non-finite at step 10")
    run = os.path.join(cfg.storage_path, "gloo-nan")
    assert _steps(run) == [4, 8] and read_stop(cfg) == summaries[0]["stopped"]
    for step in (4, 8):
        state, meta = load_step(run, step)
        assert meta["world_size"] == 2 and meta["grad_accum_steps"] == 1
        ref, _ = load_step(local_baseline, step)
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step} {k}: {m}")
