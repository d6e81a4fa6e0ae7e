"""raychat.storage: local paths and URIs (file:// stands in for s3:// and gs://: the same pyarrow code path)."""
import errno
import os

import pyarrow.fs as pafs
import pytest

from raychat import storage


def test_paths_local_and_remote(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert storage.is_remote("s3://b/runs") and storage.is_remote("file:///tmp/x") and not storage.is_remote("/tmp/x")
    assert storage.absolute(None) is None
    assert storage.absolute("gs://b/x/") == "gs://b/x/"  # URIs untouched
    assert storage.absolute("runs") == str(tmp_path / "runs")
    assert storage.absolute("~/runs") == os.path.join(os.path.expanduser("~"), "runs")
    assert storage.join("s3://b/runs/", "r1", "step_000004") == "s3://b/runs/r1/step_000004"
    assert storage.join("/data/runs", "r1") == "/data/runs/r1"
    fs, root = storage.filesystem("runs")
    assert isinstance(fs, pafs.LocalFileSystem) and root == str(tmp_path / "runs")
    fs, root = storage.filesystem(f"file://{tmp_path}/runs")
    assert isinstance(fs, pafs.LocalFileSystem) and root == f"{tmp_path}/runs"


def test_copies_into_local_and_uri_destinations(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "report.md").write_text("new")
    (src / "plot.png").write_bytes(b"png")
    for dest in (str(tmp_path / "a" / "run"), f"file://{tmp_path}/b/run"):
        local = dest.removeprefix("file://")
        os.makedirs(local)
        with open(os.path.join(local, "report.md"), "w") as f:
            f.write("old")
        storage.copy_into(str(src), dest)
        assert sorted(os.listdir(local)) == ["plot.png", "report.md"]
        assert open(os.path.join(local, "report.md")).read() == "new"  # replaced
        storage.copy_file_to(str(src / "plot.png"), f"{dest}/deeper/trace.json")
        assert open(os.path.join(local, "deeper", "trace.json"), "rb").read() == b"png"
    assert os.path.isdir(src), "copy_into leaves its source"


def test_materialise_a_local_directory_is_the_directory(tmp_path):
    with storage.materialise(str(tmp_path)) as d:
        assert d == str(tmp_path)


def test_copy_to_storage_deletes_the_local_copy_and_names_lasting_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYCHAT_STORAGE_TRIES", "3")
    monkeypatch.setenv("RAYCHAT_STORAGE_RETRY_S", "0")
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "optim_rank0.pt").write_bytes(b"x")
    storage.copy_to_storage(str(src), pafs.LocalFileSystem(), str(tmp_path / "run" / "step_000001"))
    assert (tmp_path / "run" / "step_000001" / "optim_rank0.pt").read_bytes() == b"x" and not src.exists()

    class Full(pafs.LocalFileSystem):
        def create_dir(self, path, recursive=True):
            raise OSError(errno.ENOSPC, "No space left on device")

    src.mkdir()
    with pytest.raises(storage.StorageError, match="No space left") as e:
        storage.copy_to_storage(str(src), Full(), str(tmp_path / "run" / "step_000002"))
    assert e.value.errno == errno.ENOSPC and not src.exists()

    class Flaky(pafs.LocalFileSystem):
        failures = 2

        def create_dir(self, path, recursive=True):
            if Flaky.failures:
                Flaky.failures -= 1
                raise OSError(errno.ECONNRESET, "reset")
            super().create_dir(path, recursive=recursive)

    src.mkdir()
    (src / "done_rank0.json").write_text("{}")
    (src / "optim_rank0.pt").write_bytes(b"y")
    logged = []
    storage.copy_to_storage(str(src), Flaky(), str(tmp_path / "run" / "step_000003"), log=logged.append)
    assert (tmp_path / "run" / "step_000003" / "optim_rank0.pt").read_bytes() == b"y"  # a passing error: retried
    assert len(logged) == 2 and "(try 1 of 3: [Errno 104] reset); retrying in 0 s" in logged[0]

    Flaky.failures = 3  # down for longer than the tries
    src.mkdir()
    with pytest.raises(storage.StorageError, match=r"step_000004: the storage failed 3 time\(s\) over 0 s") as e:
        storage.copy_to_storage(str(src), Flaky(), str(tmp_path / "run" / "step_000004"), log=logged.append)
    assert e.value.errno == storage.UNREACHABLE and not src.exists()


def test_free_bytes_and_delete_quietly(tmp_path):
    assert storage.free_bytes("s3://b/runs") is None
    assert storage.free_bytes(str(tmp_path / "not" / "yet")) > 0  # its nearest existing parent
    (tmp_path / "d").mkdir()
    storage.delete_quietly(pafs.LocalFileSystem(), str(tmp_path / "d"))
    storage.delete_quietly(pafs.LocalFileSystem(), str(tmp_path / "d"))  # gone already: no error
    assert not (tmp_path / "d").exists()
