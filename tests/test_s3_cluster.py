"""A Tune sweep on s3://, against the real S3-compatible server of tests/_s3.py: the shards, the tokenizer, the
sweep's outputs and every checkpoint in the bucket, nothing shared on local disk. (The two-node job on s3:// is
tests/test_multinode.py.)"""
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import _TEST_ENV, ray_processes
from tests._s3 import BUCKET, REPO, complete_checkpoint, s3, s3_env  # noqa: F401
from tests._two_node_cluster import wait_gone


def _read(s3, key) -> str:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_sweep_on_s3(s3_env, tiny_data_dir, tiny_tokenizer_dir, tmp_path):
    s3 = s3_env
    data = s3.upload_dir(tiny_data_dir, "cluster/data")
    tok = s3.upload_dir(tiny_tokenizer_dir, "cluster/tokenizer")
    env = {**os.environ, **_TEST_ENV, **s3.env, "RAYCHAT_STORAGE_TRIES": "3", "RAYCHAT_STORAGE_RETRY_S": "0.5",
           "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    # One trial, 8 steps, checkpoints at 4 and 8, reading its shards and tokenizer from the bucket.
    ray_tmp = tempfile.mkdtemp(prefix="rs3t", dir="/tmp")  # short: Ray's socket paths have a limit
    sweep = subprocess.run(
        [sys.executable, "-m", "raychat.tune", os.path.join(REPO, "tune_configs", "cpu_smoke.yaml"),
         "--name", "s3sweep", "--storage-path", f"s3://{BUCKET}/cluster/sweeps",
         "--set", f"train.data_dir={data}", "--set", f"train.tokenizer_dir={tok}", "--set", "num_samples=1",
         "--set", "max_concurrent_trials=1", "--set", "scheduler={type: fifo}", "--set", "train.num_iterations=8",
         "--set", "train.save_every=4"],
        cwd=REPO, env={**env, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True, timeout=300)
    assert wait_gone(ray_tmp) == [], f"Ray processes outlived the sweep: {ray_processes(ray_tmp)}"
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert sweep.returncode == 0, sweep.stdout[-4000:] + sweep.stderr[-4000:]
    prefix = "cluster/sweeps/s3sweep"
    for name in ("results.csv", "results.md", "best_command.txt"):
        assert s3.keys(f"{prefix}/{name}"), f"{name} is not in the bucket: {s3.keys(prefix + '/')}"
    table = list(csv.DictReader(io.StringIO(_read(s3, f"{prefix}/results.csv"))))
    assert len(table) == 1 and table[0]["status"] == "done" and table[0]["steps"] == "8", table
    run_dir = table[0]["run_dir"]
    assert run_dir.startswith(f"s3://{BUCKET}/{prefix}/runs/s3sweep-"), run_dir
    assert s3.steps(run_dir[len(f"s3://{BUCKET}/"):]) == [4, 8]
    assert complete_checkpoint(run_dir, 1) == 8
