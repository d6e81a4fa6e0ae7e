"""Runs that cannot be corrupted: one driver per run (raychat.lease), inputs that cannot drift unnoticed
(raychat.inputs), and a run directory that survives deleted or damaged checkpoints (raychat.runs). Each check
runs on a local directory and on the S3 server of tests/_s3.py."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import STEPS, assert_same_run, flip_bytes, tiny_args, tiny_config, train_local
from raychat import lease as leases
from raychat.train import main
from tests._s3 import BUCKET, s3, s3_env  # noqa: F401

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh place for runs and inputs: a local directory, or a prefix in the S3 server's bucket (this
    process configured for it through the AWS environment variables)."""
    if request.param == "local":
        return Place(str(tmp_path), None)
    s3 = request.getfixturevalue("s3_env")
    return Place(f"s3://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}", s3)


class Place:
    def __init__(self, root, s3):
        self.root, self.s3 = root, s3

    def path(self, *parts):
        return "/".join([self.root, *parts])

    def put_dir(self, local_dir, name):
        """A copy of a local directory's files at `name` here; returns its path."""
        if self.s3 is None:
            shutil.copytree(local_dir, self.path(name))
            return self.path(name)
        return self.s3.upload_dir(local_dir, self.path(name).removeprefix(f"s3://{BUCKET}/"))

    def put_file(self, local_file, dest):
        if self.s3 is None:
            shutil.copy(local_file, dest)
        else:
            self.s3.client().upload_file(local_file, BUCKET, dest.removeprefix(f"s3://{BUCKET}/"))


# ----------------------------------------------------------------------------------------------------
# One driver per run


def test_a_second_driver_is_refused_at_once_naming_the_live_one(where, tiny_data_dir, tiny_tokenizer_dir, capsys):
    """A live driver holds run `r` (this process, as if it were training); `python -m raychat.train` on the same
    run exits 2 before starting anything, naming the run and the driver, and writes nothing."""
    runs = where.path("runs")
    held = leases.Lease.acquire(where.path("runs", "r"), "r")
    try:
        started = time.monotonic()
        assert main(tiny_args(tiny_data_dir, tiny_tokenizer_dir, runs, "r")) == 2
        assert time.monotonic() - started < 15
        err = capsys.readouterr().err
        assert f"error: run r is being trained by the driver pid {os.getpid()} on host {socket.gethostname()}" in err
        assert "a second driver would interleave its checkpoints" in err and "pass another --run-name" in err
        assert held.read()["owner"] == held.record["owner"]  # the live driver keeps its lease
    finally:
        held.release()
    assert held.read() is None


def test_a_killed_drivers_lease_is_taken_over(where, capsys):
    """A driver SIGKILLed on this host leaves its lease; the next one takes it over at once (that pid is gone).
    A lease from another host is taken over once its heartbeat is older than the TTL, and refused before."""
    run = where.path("runs", "k")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from raychat.lease import Lease; "
                               f"Lease.acquire({run!r}, 'k'); print('held', flush=True); time.sleep(120)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    logged = []
    leases.Lease.acquire(run, "k", log=logged.append).release()
    assert len(logged) == 1 and logged[0].startswith(f"Run k: taking over the lease of the driver pid {holder.pid} "
                                                     f"on host {socket.gethostname()}")
    assert logged[0].endswith("that process is gone")

    other = {"owner": "x", "host": "node-elsewhere", "pid": 1, "pid_start": None, "started": time.time() - 500,
             "heartbeat": time.time() - 5, "ttl_s": 60}
    _write_record(run, other)
    with pytest.raises(leases.RunBusy, match="run k is being trained by the driver pid 1 on host node-elsewhere"):
        leases.Lease.acquire(run, "k")
    _write_record(run, dict(other, heartbeat=time.time() - 61))
    logged = []
    leases.Lease.acquire(run, "k", log=logged.append).release()
    assert "on host node-elsewhere" in logged[0] and "no heartbeat for more than 60 s" in logged[0]


def _write_record(run, record):
    from raychat import storage

    fs, path = storage.filesystem(storage.join(run, leases.LEASE_FILE))
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(record).encode())


def test_two_drivers_starting_together_one_wins(where):
    """Both see no lease and write theirs; reading back after the settle time, exactly one finds its own."""
    run = where.path("runs", "race")
    barrier, outcome = threading.Barrier(2), []

    def start():
        barrier.wait()
        try:
            outcome.append(leases.Lease.acquire(run, "race", log=lambda m: None))
        except leases.RunBusy as e:
            outcome.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcome if isinstance(o, leases.Lease)]
    lost = [o for o in outcome if isinstance(o, leases.RunBusy)]
    assert len(won) == 1 and len(lost) == 1, outcome
    assert "run race" in str(lost[0]) and ("while this one started" in str(lost[0]) or
                                           "is being trained by" in str(lost[0]))
    won[0].release()


def test_the_heartbeat_is_renewed(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYCHAT_LEASE_TTL_S", "0.4")  # renewed every 0.1 s
    lease = leases.Lease.acquire(str(tmp_path / "r"), "r", settle_s=0)
    first = lease.read()["heartbeat"]
    time.sleep(0.5)
    assert lease.read()["heartbeat"] > first and lease.read()["owner"] == lease.record["owner"]
    lease.release()
    assert not (tmp_path / "r").exists()  # the lease was all it wrote


# ----------------------------------------------------------------------------------------------------
# Inputs that cannot drift


def _rewrite_shard(src, dest, change):
    """`src` rewritten to `dest` with `change` applied to every document, in row groups of the same sizes."""
    pf = pq.ParquetFile(src)
    with pq.ParquetWriter(dest, pf.schema_arrow) as w:
        for r in range(pf.num_row_groups):
            texts = pf.read_row_group(r, columns=["text"]).column("text").to_pylist()
            w.write_table(pa.table({"text": [change(t) for t in texts]}))


def test_changed_inputs_are_refused_unless_allowed(where, tiny_data_dir, tiny_tokenizer_dir, tmp_path, capsys):
    """A run trained on inputs A (shards and tokenizer) records their fingerprint in each checkpoint. Copied
    elsewhere unchanged (B, another directory or bucket prefix) the run resumes; with a shard rewritten (same
    rows and row groups, other text) or the tokenizer changed, the driver refuses naming the change and the flag,
    and the worker refuses too; --allow-changed names make the same resume legal, except for a changed shard
    list, which the saved data positions cannot follow."""
    a_data, a_tok = where.put_dir(tiny_data_dir, "a/data"), where.put_dir(tiny_tokenizer_dir, "a/tokenizer")
    runs = where.path("runs")
    summary, _ = train_local(tiny_config(a_data, a_tok, runs, "fp"))
    assert summary["step"] == STEPS
    b_data, b_tok = where.put_dir(tiny_data_dir, "b/data"), where.put_dir(tiny_tokenizer_dir, "b/tokenizer")

    def dry_run(*extra):
        code = main(tiny_args(b_data, b_tok, runs, "fp", "--dry-run", *extra))
        return code, capsys.readouterr()

    code, out = dry_run()
    assert code == 0 and "Run fp resumes from step 16" in out.out, out  # moved, same files: legal
    _rewrite_shard(os.path.join(tiny_data_dir, "shard_00001.parquet"), tmp_path / "shard_00001.parquet", str.upper)
    where.put_file(str(tmp_path / "shard_00001.parquet"), f"{b_data}/shard_00001.parquet")
    code, out = dry_run()
    assert code == 2, out
    assert "run fp would resume from step 16" in out.err and "on other inputs than it was trained on: the shards " \
        "changed: shard_00001.parquet rewritten (bytes" in out.err and "add --allow-changed data" in out.err
    with pytest.raises(ValueError, match="shard_00001.parquet rewritten"):  # the worker checks the same
        train_local(tiny_config(b_data, b_tok, runs, "fp"))
    code, out = dry_run("--allow-changed", "data")
    assert code == 0 and "Changed inputs from step 16 on (--allow-changed): the shards changed" in out.out

    torch.save(torch.zeros(512, dtype=torch.int32), tmp_path / "token_bytes.pt")
    where.put_file(str(tmp_path / "token_bytes.pt"), f"{b_tok}/token_bytes.pt")
    code, out = dry_run("--allow-changed", "data")
    assert code == 2 and "the tokenizer changed (token_bytes.pt differ)" in out.err
    assert "--allow-changed tokenizer" in out.err and "shard" not in out.err.split("other inputs")[1]

    where.put_file(os.path.join(tiny_data_dir, "shard_00002.parquet"), f"{b_data}/shard_00009.parquet")
    code, out = dry_run("--allow-changed", "data,tokenizer")
    assert code == 2 and "shard_00009.parquet added" in out.err and "even with --allow-changed data" in out.err


def test_the_fingerprint_holds_no_path(tiny_data_dir, tiny_tokenizer_dir):
    from raychat.inputs import fingerprint, read_tokenizer_files

    fp = fingerprint(tiny_data_dir, read_tokenizer_files(tiny_tokenizer_dir))
    assert [s["name"] for s in fp["data"]["train"]] == [f"shard_0000{i}.parquet" for i in range(5)]
    assert fp["data"]["val"]["name"] == "val.parquet" and set(fp["tokenizer"]) == {"tokenizer.pkl", "token_bytes.pt"}
    assert tiny_data_dir not in json.dumps(fp) and tiny_tokenizer_dir not in json.dumps(fp)


# ----------------------------------------------------------------------------------------------------
# Deleted and damaged checkpoints


@pytest.mark.slow
def test_deleted_newest_checkpoint_resumes_from_the_newest_that_verifies(baseline, tiny_data_dir,
                                                                         tiny_tokenizer_dir, tmp_path, capsys):
    """A copy of the uninterrupted 2-worker run (with Ray Train's checkpoint list) whose step 16 was deleted and
    step 12 damaged: Ray Train would refuse the run directory (a listed checkpoint that does not exist); the
    rerun drops the deleted step from Ray's list, skips step 12 (checksum), says it resumes from step 8 and ends
    bit-identical. (On s3://, tests/test_s3.py does the same with a deleted step.)"""
    storage = str(tmp_path / "runs")
    shutil.copytree(baseline, os.path.join(storage, "holes"))
    assert os.path.exists(os.path.join(storage, "holes", "checkpoint_manager_snapshot.json"))
    shutil.rmtree(os.path.join(storage, "holes", "step_000016"))
    flip_bytes(os.path.join(storage, "holes", "step_000012", "model.pt"))
    args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, "holes", "--num-workers", "2",
                     "--data-backend", "inline")
    assert main(args) == 0
    out = capsys.readouterr()
    said = out.out + out.err
    assert "WARNING: skipping incomplete checkpoint" in said and "step_000012/model.pt does not match its checksum" in said
    assert "checkpoint(s) step_000016 no longer exist; dropped from Ray Train's checkpoint list" in said
    assert "Run holes resumes from step 8" in said
    assert_same_run(os.path.join(storage, "holes"), baseline)
