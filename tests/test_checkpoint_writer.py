"""BackgroundWriter: the checkpoint holds the state as it was at submit, however training changes it after
wait_staged(), and the loop learns of a write's end (done) or its failure (wait) without racing it."""
import json
import os
import threading

import pytest
import torch

from raychat import checkpoint as ckpt_files
from raychat import saver
from raychat.saver import BackgroundWriter, _tensors


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
