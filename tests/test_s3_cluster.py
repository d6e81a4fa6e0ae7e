"""A Tune sweep and a two-node run on s3://, against the real S3-compatible server of tests/_s3.py: the shards,
the tokenizer, the sweep's outputs and every checkpoint in the bucket, nothing shared on local disk.

One test, as each part costs a Ray start: (a) a one-trial sweep of tune_configs/cpu_smoke.yaml; (b) the job of
tests/test_multinode.py (a 2-node `ray.cluster_utils.Cluster`, 2 workers of 1 CPU, one per node)."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

from conftest import _TEST_ENV, ray_processes, tiny_args
from raychat import checkpoint as ckpt_files
from raychat import runs
from tests._s3 import BUCKET, REPO, s3, s3_env  # noqa: F401
from tests.test_multinode import HELPER, _wait_gone


def _read(s3, key) -> str:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def _complete_checkpoint(run_dir: str, world_size: int) -> int:
    """The step of the newest complete checkpoint of a run in the bucket, checked for `world_size` ranks."""
    with runs.find_checkpoint(run_dir, log=lambda m: None) as found:
        assert ckpt_files.check_complete(found.local_dir) is None
        assert ckpt_files.read_meta(found.local_dir)["world_size"] == world_size
        for rank in range(world_size):
            assert os.path.exists(os.path.join(found.local_dir, f"optim_rank{rank}.pt"))
        return found.step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tune_sweep_and_two_node_run_on_s3(s3_env, tiny_data_dir, tiny_tokenizer_dir, tmp_path):
    s3 = s3_env
    data = s3.upload_dir(tiny_data_dir, "cluster/data")
    tok = s3.upload_dir(tiny_tokenizer_dir, "cluster/tokenizer")
    env = {**os.environ, **_TEST_ENV, **s3.env, "RAYCHAT_STORAGE_TRIES": "3", "RAYCHAT_STORAGE_RETRY_S": "0.5",
           "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    # (a) One trial, 8 steps, checkpoints at 4 and 8, reading its shards and tokenizer from the bucket.
    ray_tmp = tempfile.mkdtemp(prefix="rs3t", dir="/tmp")  # short: Ray's socket paths have a limit
    sweep = subprocess.run(
        [sys.executable, "-m", "raychat.tune", os.path.join(REPO, "tune_configs", "cpu_smoke.yaml"),
         "--name", "s3sweep", "--storage-path", f"s3://{BUCKET}/cluster/sweeps",
         "--set", f"train.data_dir={data}", "--set", f"train.tokenizer_dir={tok}", "--set", "num_samples=1",
         "--set", "max_concurrent_trials=1", "--set", "scheduler={type: fifo}", "--set", "train.num_iterations=8",
         "--set", "train.save_every=4"],
        cwd=REPO, env={**env, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True, timeout=300)
    assert _wait_gone(ray_tmp) == [], f"Ray processes outlived the sweep: {ray_processes(ray_tmp)}"
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
    assert _complete_checkpoint(run_dir, 1) == 8

    # (b) The two-node job, its storage and data in the bucket: the cluster's processes and the job get the
    # store's environment as a user's would.
    ray_tmp = tempfile.mkdtemp(prefix="rs3m", dir="/tmp")
    bindir = os.path.dirname(sys.executable)
    cluster_env = {**env, "RAY_TMPDIR": ray_tmp, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    name = f"s3-multinode-{uuid.uuid4().hex[:8]}"
    storage = f"s3://{BUCKET}/cluster/runs"
    helper_log_path = tmp_path / "cluster_helper.log"
    with open(helper_log_path, "w") as helper_log:
        helper = subprocess.Popen([sys.executable, HELPER, "--cpus-per-node", "1"], cwd=REPO, env=cluster_env,
                                  text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=helper_log)
        try:
            ready_line = helper.stdout.readline()
            assert ready_line, f"the cluster helper exited early:\n{helper_log_path.read_text()[-4000:]}"
            ready = json.loads(ready_line)
            args = tiny_args(data, tok, storage, name, "--num-workers", "2", "--cpus-per-worker", "1",
                             "--data-backend", "inline", "--num-iterations", "8", "--max-failures", "0")
            runtime_env = {"env_vars": {k: cluster_env[k] for k in (*_TEST_ENV, *s3.env, "RAYCHAT_STORAGE_TRIES",
                                                                     "RAYCHAT_STORAGE_RETRY_S")}}
            submission_id = f"raychat-{name}"
            submit = subprocess.run(
                [os.path.join(bindir, "ray"), "job", "submit", "--address", ready["dashboard"], "--submission-id",
                 submission_id, "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
                 "python", "-m", "raychat.train", *args],
                cwd=REPO, env=cluster_env, capture_output=True, text=True, timeout=240)
            log = submit.stdout[-6000:] + submit.stderr[-3000:]
            assert submit.returncode == 0, f"`ray job submit` failed:\n{log}"
            helper.stdin.write(submission_id + "\n")
            helper.stdin.flush()
            report = json.loads(helper.stdout.readline())
        finally:
            if helper.poll() is None:
                helper.stdin.close()  # EOF: the helper shuts the cluster down
                try:
                    helper.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    helper.kill()
                    helper.wait()
    assert _wait_gone(ray_tmp) == [], "Ray processes outlived the cluster"
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert report["job_status"] == "SUCCEEDED", log
    assert {w["node_id"] for w in report["workers"]} == set(ready["nodes"]), report
    assert s3.steps(f"cluster/runs/{name}") == [4, 8]
    assert _complete_checkpoint(f"{storage}/{name}", 2) == 8
