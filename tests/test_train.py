"""End-to-end training on a real local Ray: 2 gloo workers, a tiny model, tinyshakespeare shards.

One uninterrupted run (the `baseline` fixture in conftest.py) is the reference every resumed run must equal,
tensor for tensor. The loop's own semantics (resuming, NaN handling, changed settings) are tested without Ray
in test_loop.py; here is what needs Ray Train: its worker group and the driver (its automatic restart after a
worker dies is in test_reliability.py).
"""
import os

import pytest
import torch

from conftest import STEPS, final_state, tiny_args
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


def test_two_workers_equal_one_worker_with_accumulation(baseline, local_baseline):
    """Data slots make 2 Ray workers x 1 micro-batch see the batches 1 worker x 2 sees (docs/ARCHITECTURE.md),
    so the weights agree at every checkpoint (to fp32 reduction-order noise) with the same run trained without
    Ray. The logged loss and val bpb are not compared: the reference logs rank 0's last micro-batch, and
    validation shards row groups by rank."""
    for step in (4, 8, 12, STEPS):
        name = ckpt_files.step_dir_name(step)
        assert ckpt_files.read_meta(os.path.join(local_baseline, name))["grad_accum_steps"] == 2
        state = torch.load(os.path.join(local_baseline, name, "model.pt"), weights_only=True)
        ref = torch.load(os.path.join(baseline, name, "model.pt"), weights_only=True)
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step} {k}: {m}")


def test_failed_training_says_how_to_resume(ray_local, tiny_data_dir, tiny_tokenizer_dir, storage, monkeypatch,
                                            capsys):
    """Once Ray Train gives up (its restarts spent), the driver exits 1 saying that the checkpoints are kept
    and that the same command resumes (test_loop.py shows that it does)."""
    import ray.train

    import raychat.train

    class FailingTrainer:
        def fit(self):
            raise ray.train.TrainingFailedError("worker died")

    monkeypatch.setattr(raychat.train, "build_trainer", lambda cfg: FailingTrainer())
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "gaveup", "--num-workers", "2",
                     "--max-failures", "0")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: training failed after 0 automatic restart(s)" in err
    assert "rerun the same command (--run-name gaveup) to resume" in err
