"""End-to-end training on a real local Ray: 2 gloo workers, a tiny model, tinyshakespeare shards.

One uninterrupted run (module fixture) is the reference every resumed run must equal, tensor for tensor.
"""
import os
import shutil

import pytest
import torch

from raychat import checkpoint as ckpt_files
from raychat.train import main

pytestmark = pytest.mark.slow

STEPS = 16


def tiny_args(data_dir, tok_dir, storage, name, *extra):
    return ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
            "--device-batch-size", "4", "--total-batch-size", "512", "--window-pattern", "SL",
            "--num-iterations", str(STEPS), "--eval-every", "8", "--eval-tokens", "1024",
            "--core-metric-every", "-1", "--sample-every", "-1", "--save-every", "4",
            "--data-dir", data_dir, "--tokenizer-dir", tok_dir, "--storage-path", storage,
            "--run-name", name, *extra]


def final_state(run_dir):
    steps = ckpt_files.list_step_dirs(run_dir)
    step, path = steps[-1]
    assert step == STEPS and ckpt_files.check_complete(path) is None
    return torch.load(os.path.join(path, "model.pt"), weights_only=True), ckpt_files.read_meta(path)


def assert_same_run(run_dir, baseline_dir):
    state, meta = final_state(run_dir)
    ref_state, ref_meta = final_state(baseline_dir)
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), f"{k} differs from the uninterrupted run"
    assert meta["history"]["train_loss"] == ref_meta["history"]["train_loss"]
    assert meta["history"]["val_bpb"] == ref_meta["history"]["val_bpb"]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return str(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def baseline(ray_local, tiny_data_dir, tiny_tokenizer_dir, storage):
    """The uninterrupted 2-worker run, streaming tokens through Ray Data, with samples at the end."""
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "baseline", "--num-workers", "2",
                     "--data-backend", "ray", "--sample-every", str(STEPS))
    assert main(args) == 0
    return os.path.join(storage, "baseline")


def test_end_to_end_two_workers(baseline):
    state, meta = final_state(baseline)
    assert meta["world_size"] == 2 and meta["grad_accum_steps"] == 1
    val = [v for _, v in meta["history"]["val_bpb"]]
    assert [s for s, _ in meta["history"]["val_bpb"]] == [0, 8, 16]
    assert val[-1] < val[0], f"val bpb did not fall: {val}"
    assert [s for s, _ in ckpt_files.list_step_dirs(baseline)] == [4, 8, 12, 16]
    report = open(os.path.join(baseline, "report.md")).read()
    assert "Minimum validation bpb" in report and "Number of parameters" in report
    for png in ("train_loss.png", "val_bpb.png"):
        with open(os.path.join(baseline, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_automatic_recovery_after_worker_dies(baseline, tiny_data_dir, tiny_tokenizer_dir, storage):
    """Rank 0 exits hard (os._exit) at step 10; Ray restarts the workers from the newest checkpoint."""
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "autorecover", "--num-workers", "2",
                     "--data-backend", "inline", "--max-failures", "1", "--debug-fail-at-step", "10")
    assert main(args) == 0
    assert os.path.exists(os.path.join(storage, "autorecover", ".injected_failure_step10"))
    assert_same_run(os.path.join(storage, "autorecover"), baseline)


def test_resume_by_run_name(baseline, tiny_data_dir, tiny_tokenizer_dir, storage, capsys):
    common = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "byname", "--num-workers", "2",
                       "--data-backend", "inline")
    assert main(common + ["--max-failures", "0", "--debug-fail-at-step", "10"]) == 1
    assert "rerun the same command" in capsys.readouterr().err
    assert ckpt_files.list_step_dirs(os.path.join(storage, "byname"))[-1][0] < STEPS
    assert main(common) == 0  # the same command again: resumes
    assert_same_run(os.path.join(storage, "byname"), baseline)


def test_resume_from_step(baseline, tiny_data_dir, tiny_tokenizer_dir, storage):
    run = os.path.join(storage, "fromstep")
    os.makedirs(run)
    shutil.copytree(os.path.join(baseline, "step_000008"), os.path.join(run, "step_000008"))
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "fromstep", "--num-workers", "2",
                     "--data-backend", "inline", "--resume-from-step", "8")
    assert main(args) == 0
    assert_same_run(run, baseline)


def test_one_worker_with_accumulation_equals_two_workers(baseline, tiny_data_dir, tiny_tokenizer_dir, storage):
    """Data slots make 1 worker x 2 micro-batches see the batches 2 workers x 1 see (docs/ARCHITECTURE.md), so
    the weights agree at every checkpoint (to fp32 reduction-order noise). The logged loss and val bpb are not
    compared: the reference logs rank 0's last micro-batch, and validation shards row groups by rank."""
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "accum", "--num-workers", "1",
                     "--data-backend", "inline")
    assert main(args) == 0
    run = os.path.join(storage, "accum")
    assert ckpt_files.read_meta(os.path.join(run, "step_000016"))["grad_accum_steps"] == 2
    for step in (4, 8, 12, 16):
        name = ckpt_files.step_dir_name(step)
        state = torch.load(os.path.join(run, name, "model.pt"), weights_only=True)
        ref = torch.load(os.path.join(baseline, name, "model.pt"), weights_only=True)
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step} {k}: {m}")


def test_mismatched_checkpoint_is_refused_before_work(baseline, tiny_data_dir, tiny_tokenizer_dir, storage, capsys):
    before = sorted(os.listdir(baseline))
    # A real launch (not --dry-run): the refusal must come before any Ray work starts.
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "baseline", "--num-workers", "2")
    assert main([*args, "--depth", "3"]) == 2
    assert "another model" in capsys.readouterr().err
    assert main([*args, "--num-workers", "1"]) == 2
    assert "written by 2 workers" in capsys.readouterr().err
    assert sorted(os.listdir(baseline)) == before
