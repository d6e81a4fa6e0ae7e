"""raychat.runs: the run directory, the checkpoint eval and export read, the stop record."""
import dataclasses
import os

import pytest
import torch

from raychat import checkpoint as ckpt_files
from raychat import runs
from raychat.config import TrainConfig


def _save(run_dir, step):
    d = os.path.join(run_dir, ckpt_files.step_dir_name(step))
    ckpt_files.save_rank_files(d, 0, {"m": torch.zeros(4)}, {"slot": 0}, model_state={"w": torch.full((64,), step)},
                               meta={"step": step, "world_size": 1})
    return d


def _corrupt(d):
    path = os.path.join(d, ckpt_files.MODEL_FILE)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.fixture
def run(tmp_path):
    """Run `r` with steps 4 (complete), 8 (complete), 12 (corrupt model.pt) and 16 (rank 0 never finished)."""
    run_dir = str(tmp_path / "runs" / "r")
    for step in (4, 8, 12):
        _save(run_dir, step)
    _corrupt(os.path.join(run_dir, "step_000012"))
    os.remove(os.path.join(_save(run_dir, 16), "done_rank0.json"))
    return run_dir


def test_newest_complete_checkpoint_skipping_damaged_ones(run):
    logged = []
    with runs.find_checkpoint(run, log=logged.append) as found:
        assert found == (8, os.path.join(run, "step_000008"), os.path.join(run, "step_000008"))
    assert len(logged) == 2 and all(m.startswith("WARNING: skipping incomplete checkpoint") for m in logged)
    assert "step_000016/done_rank0.json" in logged[0] and "step_000012/model.pt does not match its checksum" in logged[1]


def test_an_explicit_step_is_that_step_or_an_error(run):
    with runs.find_checkpoint(run, step=4) as found:
        assert found.step == 4 and ckpt_files.read_meta(found.local_dir)["step"] == 4
    with pytest.raises(ValueError, match=r"--step 12: checkpoint .*step_000012 cannot be used: .*model.pt does not "
                                         r"match its checksum.*; pick another step"):
        with runs.find_checkpoint(run, step=12):
            pass
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 5 in"):
        with runs.find_checkpoint(run, step=5):
            pass


def test_no_complete_checkpoint(tmp_path):
    _corrupt(_save(str(tmp_path / "r"), 4))
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint in .*/r; list the run"):
        with runs.find_checkpoint(str(tmp_path / "r"), log=lambda m: None):
            pass


def test_a_uri_run_directory_is_listed_and_read_through_pyarrow(run):
    uri = f"file://{run}"
    assert runs.list_run_steps(uri) == [(s, f"{uri}/{ckpt_files.step_dir_name(s)}") for s in (4, 8, 12, 16)]
    with runs.find_checkpoint(uri, log=lambda m: None) as found:
        assert found.step == 8 and found.path == f"{uri}/step_000008"
        assert ckpt_files.read_meta(found.local_dir)["step"] == 8


def test_find_run_names_the_runs_there(run, tmp_path):
    storage_path = os.path.dirname(run)
    assert runs.find_run(storage_path, "r") == run
    with pytest.raises(FileNotFoundError, match=r"no run named x under .* \(the runs there: r\)"):
        runs.find_run(storage_path, "x")
    with pytest.raises(FileNotFoundError, match=r"\(it holds no runs\)"):
        runs.find_run(str(tmp_path / "empty"), "x")
    assert runs.find_run("s3://bucket/runs", "x") == "s3://bucket/runs/x"  # looked up when it is read


def test_resume_checkpoint_and_the_stop_record(run):
    cfg = dataclasses.replace(TrainConfig(), storage_path=os.path.dirname(run), run_name="r")
    assert runs.run_dir(cfg) == run
    with runs.resume_checkpoint(cfg, log=lambda m: None) as d:
        assert d == os.path.join(run, "step_000008")
    with pytest.raises(ValueError, match="--resume-from-step 12: checkpoint .* is incomplete or corrupt"):
        with runs.resume_checkpoint(dataclasses.replace(cfg, resume_from_step=12), log=lambda m: None):
            pass
    assert runs.read_stop(cfg) is None
    runs.write_stop(cfg, "loss is nan at step 3")
    assert runs.read_stop(cfg, remove=True) == "loss is nan at step 3"
    assert runs.read_stop(cfg) is None
