"""raychat.saver. BackgroundWriter: the checkpoint holds the state as it was at submit, however training changes
it after wait_staged(), and the loop learns of a write's end (done) or its failure (wait) without racing it.
CheckpointSaver: a checkpoint is reported only once its files are in storage, and a storage that refuses it for
a lasting reason ends the run with one reason instead of an exception (which Ray Train would retry)."""
import errno
import json
import os
import shutil
import threading

import pytest
import torch

from raychat import checkpoint as ckpt_files
from raychat import saver
from raychat.saver import BackgroundWriter, CheckpointSaver, _tensors
from raychat.storage import StorageError


def _state():
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture
def held_write(monkeypatch):
    """Make the writer's file write wait until the test releases it, so the test can change the live state
    between staging and writing (otherwise a small write usually finishes first and hides a missing copy)."""
    release = threading.Event()
    real = saver.save_rank_files

    def save_when_released(*args, **kwargs):
        assert release.wait(30)
        real(*args, **kwargs)

    monkeypatch.setattr(saver, "save_rank_files", save_when_released)
    return release


def test_checkpoint_is_the_state_at_submit(tmp_path, held_write):
    model, optimizer = _state()
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_avg = optimizer.state[model.weight]["exp_avg"].clone()
    meta = {"step": 7, "history": [[1, 2.0]]}
    data_state = [{"row": 3}]
    writer = BackgroundWriter()
    writer.submit(str(tmp_path), 0, optimizer.state_dict(), data_state, model_state=model.state_dict(), meta=meta)
    writer.wait_staged()
    # Training goes on: weights, optimizer moments, hyperparameters, history and data position all change.
    model(torch.randn(2, 8)).sum().backward()
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()
    meta["history"].append([2, 1.0])
    data_state[0]["row"] = 4
    assert not writer.done()
    held_write.set()
    writer.wait()
    assert writer.done()
    assert set(writer.timings) == {"staged", "written"} and writer.timings["written"] >= writer.timings["staged"]

    saved_model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved_model.keys() == expected_model.keys()
    for k in expected_model:
        assert torch.equal(saved_model[k], expected_model[k]) and not torch.equal(saved_model[k], model.state_dict()[k])
    saved_optim = torch.load(tmp_path / "optim_rank0.pt", weights_only=True)
    assert torch.equal(saved_optim["state"][0]["exp_avg"], expected_avg)
    assert saved_optim["param_groups"][0]["lr"] == 0.1
    assert json.loads((tmp_path / "meta.json").read_text()) == {"step": 7, "history": [[1, 2.0]]}
    assert json.loads((tmp_path / "data_rank0.json").read_text()) == [{"row": 3}]
    assert ckpt_files.check_complete(str(tmp_path)) is None


def test_one_write_at_a_time(tmp_path, held_write):
    model, optimizer = _state()
    writer = BackgroundWriter()
    writer.wait_staged()  # nothing submitted: returns at once
    writer.submit(str(tmp_path / "a"), 0, optimizer.state_dict(), [], model_state=model.state_dict(), meta={})
    second = threading.Thread(target=writer.submit, args=(str(tmp_path / "b"), 0, optimizer.state_dict(), []))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "a second submit must wait for the first write"
    held_write.set()
    second.join(30)
    writer.wait()
    assert (tmp_path / "a" / "done_rank0.json").exists() and (tmp_path / "b" / "done_rank0.json").exists()


def test_write_error_is_raised_on_the_training_thread(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    model, optimizer = _state()
    writer = BackgroundWriter()
    writer.submit(str(blocker), 0, optimizer.state_dict(), [], model_state=model.state_dict(), meta={})
    with pytest.raises(RuntimeError, match="writing the checkpoint failed.*not_a_dir"):
        writer.wait_staged()  # the loop's next call to the writer raises, whichever it is
        writer.wait()
    assert not os.path.isdir(blocker)
    writer.wait()  # raised once; the writer is usable again


def test_reserved_buffers_are_reused_and_each_checkpoint_is_its_own(tmp_path):
    model, optimizer = _state()
    writer = BackgroundWriter()
    writer.reserve(optimizer.state_dict(), model.state_dict())
    writer.wait()
    reserved = [b.data_ptr() for b in writer._buffers]
    assert len(reserved) == len(_tensors((optimizer.state_dict(), model.state_dict())))
    expected = []
    for name in ("a", "b"):
        expected.append({k: v.clone() for k, v in model.state_dict().items()})
        writer.submit(str(tmp_path / name), 0, optimizer.state_dict(), [], model_state=model.state_dict(), meta={})
        writer.wait_staged()
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        writer.wait()
        assert [b.data_ptr() for b in writer._buffers] == reserved  # copied into the reserved memory
    for name, want in zip(("a", "b"), expected):
        saved = torch.load(tmp_path / name / "model.pt", weights_only=True)
        assert all(torch.equal(saved[k], want[k]) for k in want)
    assert not torch.equal(expected[0]["weight"], expected[1]["weight"])
    # A state of another shape (a rank without the model) gets buffers of its own shapes.
    writer.submit(str(tmp_path / "c"), 1, optimizer.state_dict(), [])
    writer.wait()
    assert len(writer._buffers) == len(_tensors(optimizer.state_dict()))
    saved = torch.load(tmp_path / "c" / "optim_rank1.pt", weights_only=True)
    assert torch.equal(saved["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"])


def test_uncopied_checkpoint_writes_the_live_state_and_allocates_no_buffers(tmp_path):
    """copy=False (the run's last checkpoint): the files hold the live tensors, and no host copy is made."""
    model, optimizer = _state()
    writer = BackgroundWriter()
    writer.submit(str(tmp_path), 0, optimizer.state_dict(), [{"row": 1}], model_state=model.state_dict(), meta={},
                  copy=False)
    writer.wait()
    assert writer._buffers == []
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    saved = torch.load(tmp_path / "optim_rank0.pt", weights_only=True)
    assert torch.equal(saved["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"])


# ----------------------------------------------------------------------------------------------------
# CheckpointSaver, with a session that persists into a directory and records what the loop reports


class FakeSession:
    rank, world_size = 0, 1

    def __init__(self, storage, fail=None):
        self.storage, self.fail = storage, fail
        self.reports, self.discarded = [], []

    def persist(self, checkpoint_dir, step):
        if self.fail is not None:
            raise self.fail
        shutil.copytree(checkpoint_dir, os.path.join(self.storage, ckpt_files.step_dir_name(step)))

    def discard(self, step):
        self.discarded.append(step)

    def report(self, metrics, checkpoint_dir, step):
        persisted = os.path.join(self.storage, ckpt_files.step_dir_name(step))
        self.reports.append((dict(metrics), step, checkpoint_dir is not None and os.path.isdir(persisted)))


class FakeStreams:
    def state_dict(self):
        return [{"row": 1}]


class NoFaults:
    def at(self, step, kind):
        pass


def _saver(tmp_path, session):
    model, optimizer = _state()
    logged = []
    saver = CheckpointSaver(session, str(tmp_path), model, optimizer, FakeStreams(), NoFaults(), torch.device("cpu"),
                            logged.append)
    return saver, logged


def test_checkpoint_is_reported_once_it_is_in_storage(tmp_path, held_write):
    session = FakeSession(str(tmp_path / "run"))
    saver, logged = _saver(tmp_path, session)
    assert saver.save_point(4, {"step": 4}, meta={"step": 4, "world_size": 1}) is None
    saver.before_update()  # staged: the loop may change the weights
    assert saver.poll(5) is None and session.reports == []  # still writing: the report waits
    held_write.set()
    assert saver.close(6) is None
    assert session.reports == [({"step": 4}, 4, True)]
    assert ckpt_files.check_complete(str(tmp_path / "run" / "step_000004")) is None
    assert logged and logged[-1].startswith("Checkpoint of step 00004") and "reported at step 00006" in logged[-1]
    # A report without a checkpoint (an evaluation step) goes out at the next save point or poll.
    assert saver.save_point(8, {"step": 8, "val_bpb": 1.0}) is None
    assert saver.poll(9) is None
    assert session.reports[-1] == ({"step": 8, "val_bpb": 1.0}, 8, False)


def test_lasting_storage_failure_stops_the_run_with_one_reason(tmp_path):
    session = FakeSession(str(tmp_path / "run"), fail=StorageError("disk full", errno.ENOSPC))
    saver, logged = _saver(tmp_path, session)
    saver.save_point(12, {"step": 12}, meta={"step": 12, "world_size": 1})
    reason = saver.close(13)
    assert reason.startswith(f"the checkpoint of step 12 could not be saved to {tmp_path}: No space left on device; "
                             "it needs")
    assert "are free there" in reason and "the older checkpoints are intact" in reason
    assert session.discarded == [12] and session.reports == []  # no half-written step, nothing reported
    assert logged == [f"ERROR: {reason}"]


def test_other_write_failures_raise_for_a_restart(tmp_path):
    session = FakeSession(str(tmp_path / "run"), fail=ConnectionError("storage unreachable"))
    saver, _ = _saver(tmp_path, session)
    saver.save_point(4, {"step": 4}, meta={"step": 4, "world_size": 1})
    with pytest.raises(RuntimeError, match="writing the checkpoint failed: storage unreachable"):
        saver.close(5)
    assert session.discarded == [] and session.reports == []
