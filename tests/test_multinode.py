"""`ray job submit --working-dir . -- python -m raychat.train ...` on a two-node cluster, as docs/CLUSTER.md
tells users to, with everything the nodes share in a bucket: shards, tokenizer and checkpoints on the real
S3-compatible server of tests/_s3.py, nothing shared on local disk.

The cluster (head + one more node, 1 logical CPU each, all on 127.0.0.1) runs in a helper process,
tests/_two_node_cluster.py, so that this process's own Ray (conftest `ray_local`) is never touched. Two Ray
Train workers of 1 CPU each can only be placed one per node; the test checks it anyway from the state API (the
workers' node ids), and that the job succeeded, wrote complete checkpoints of a 2-worker run into the bucket,
and left no Ray process behind.
"""
import os
import shutil
import tempfile
import uuid

import pytest

from conftest import _TEST_ENV, ray_processes, tiny_args
from tests._s3 import BUCKET, complete_checkpoint, s3, s3_env  # noqa: F401
from tests._two_node_cluster import submit_job

STEPS = 8  # two checkpoints (save every 4): enough to see a complete multi-worker save, half the baseline's time


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_job_submit_spreads_two_workers_over_two_nodes_sharing_a_bucket(s3_env, tiny_data_dir, tiny_tokenizer_dir,
                                                                       tmp_path):
    s3 = s3_env
    data = s3.upload_dir(tiny_data_dir, "cluster/data")
    tok = s3.upload_dir(tiny_tokenizer_dir, "cluster/tokenizer")
    # A short private RAY_TMPDIR: Ray's unix socket paths under it must stay below 108 bytes.
    ray_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    assert ray_processes(ray_tmp) == []
    # The cluster's processes and the job get the store's environment as a user's would.
    env = {**os.environ, **_TEST_ENV, **s3.env, "RAYCHAT_STORAGE_TRIES": "3", "RAYCHAT_STORAGE_RETRY_S": "0.5",
           "RAY_TMPDIR": ray_tmp}
    job_env = {k: env[k] for k in (*_TEST_ENV, *s3.env, "RAYCHAT_STORAGE_TRIES", "RAYCHAT_STORAGE_RETRY_S")}
    name = f"multinode-{uuid.uuid4().hex[:8]}"
    storage = f"s3://{BUCKET}/cluster/runs"
    args = tiny_args(data, tok, storage, name, "--num-workers", "2", "--cpus-per-worker", "1",
                     "--data-backend", "inline", "--num-iterations", str(STEPS), "--max-failures", "0")
    job = submit_job(env, args, f"raychat-{name}", job_env, tmp_path / "cluster_helper.log")
    shutil.rmtree(ray_tmp, ignore_errors=True)

    assert len(set(job.ready["nodes"])) == 2
    assert len(job.raylets) == 2, f"expected one raylet per node, found: {job.raylets}"
    assert job.leftovers == [], f"Ray processes outlived the cluster: {job.leftovers}"
    assert job.report["job_status"] == "SUCCEEDED", f"the job ended {job.report['job_status']}:\n{job.log}"
    assert sorted(job.report["nodes"]) == sorted(job.ready["nodes"])
    workers = job.report["workers"]
    assert len(workers) == 2, f"expected the 2 Ray Train workers of one attempt, found {workers}"
    assert {w["node_id"] for w in workers} == set(job.ready["nodes"]), \
        f"the two workers did not run one per node: {workers} on nodes {job.ready['nodes']}"
    assert s3.steps(f"cluster/runs/{name}") == [4, STEPS]
    assert complete_checkpoint(f"{storage}/{name}", 2) == STEPS
    assert "Done. Checkpoints and report in" in job.submit.stdout
