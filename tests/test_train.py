"""End-to-end training on a real local Ray: 2 gloo workers, a tiny model, tinyshakespeare shards.

One uninterrupted run (the `baseline` fixture in conftest.py) is the reference every resumed run must equal, tensor for tensor.
"""
import os
import shutil

import pytest
import torch

from conftest import STEPS, assert_same_run, final_state, tiny_args
from raychat import checkpoint as ckpt_files
from raychat.train import main

pytestmark = pytest.mark.slow


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
    # Another world size is resharded (tests/test_elastic.py); other data slots are refused.
    assert main([*args, "--device-batch-size", "2"]) == 2
    assert "the data slots differ" in capsys.readouterr().err
    assert sorted(os.listdir(baseline)) == before
