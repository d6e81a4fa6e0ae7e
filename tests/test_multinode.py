"""Issue 4: `ray job submit --working-dir . -- python -m raychat.train ...` on a two-node cluster.

The cluster (head + one more node, 1 logical CPU each, all on 127.0.0.1) runs in a helper process,
tests/_two_node_cluster.py, so that this process's own Ray (conftest `ray_local`) is never touched. The job is
submitted with the real `ray` CLI, as docs/CLUSTER.md tells users to. Two Ray Train workers of 1 CPU each can
only be placed one per node; the test checks it anyway from the state API (the workers' node ids), and that the
job succeeded, wrote complete checkpoints of a 2-worker run, and left no Ray process behind.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from conftest import _TEST_ENV, tiny_args
from raychat import checkpoint as ckpt_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(REPO, "tests", "_two_node_cluster.py")
STEPS = 8  # two checkpoints (save every 4): enough to see a complete multi-worker save, half the baseline's time


def _our_ray_processes(ray_tmpdir: str) -> list[str]:
    """Command lines of live processes started for this cluster: every Ray process names its session dir,
    which lies under our private RAY_TMPDIR. (A global `pgrep raylet` would count other tests' clusters.)"""
    out = subprocess.run(["pgrep", "-af", ray_tmpdir], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip() and "pgrep" not in line]


def _wait_gone(ray_tmpdir: str, timeout_s: float = 60.0) -> list[str]:
    """Ray's worker processes exit on their own once their raylet is gone, which takes seconds on a loaded
    machine: poll rather than check once."""
    deadline = time.monotonic() + timeout_s
    while (left := _our_ray_processes(ray_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_submit_spreads_two_workers_over_two_nodes(tiny_data_dir, tiny_tokenizer_dir, tmp_path):
    assert shutil.which("pgrep"), "pgrep (procps) is needed to check that no Ray process outlives the test"
    # A short private RAY_TMPDIR: Ray's unix socket paths under it must stay below 108 bytes.
    ray_tmpdir = tempfile.mkdtemp(prefix="rmn")
    bindir = os.path.dirname(sys.executable)
    env = {**os.environ, **_TEST_ENV, "RAY_TMPDIR": ray_tmpdir,
           # The job's entrypoint `python` is resolved by the head node's shell: make it this venv's python.
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)  # the helper starts a cluster; it must not attach to another one
    storage = str(tmp_path / "runs")
    name = f"multinode-{uuid.uuid4().hex[:8]}"
    submission_id = f"raychat-{name}"
    assert _our_ray_processes(ray_tmpdir) == []

    # The helper's stderr (Ray's own logging) goes to a file: a pipe nobody drains could fill and stall it.
    helper_log_path = tmp_path / "cluster_helper.log"
    helper_log = open(helper_log_path, "w")
    helper = subprocess.Popen([sys.executable, HELPER, "--cpus-per-node", "1"], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=helper_log)
    try:
        ready_line = helper.stdout.readline()
        assert ready_line, f"the cluster helper exited early:\n{helper_log_path.read_text()[-4000:]}"
        ready = json.loads(ready_line)
        assert len(set(ready["nodes"])) == 2
        raylets = [p for p in _our_ray_processes(ray_tmpdir) if "raylet" in p.split()[1]]
        assert len(raylets) == 2, f"expected one raylet per node, found: {raylets}"

        args = tiny_args(tiny_data_dir, tiny_tokenizer_dir, storage, name, "--num-workers", "2",
                         "--cpus-per-worker", "1", "--data-backend", "inline", "--num-iterations", str(STEPS),
                         "--max-failures", "0")
        runtime_env = {"env_vars": {k: v for k, v in _TEST_ENV.items()}}
        submit = subprocess.run(
            [os.path.join(bindir, "ray"), "job", "submit", "--address", ready["dashboard"],
             "--submission-id", submission_id, "--working-dir", ".",
             "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "raychat.train", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        log = submit.stdout[-6000:] + submit.stderr[-3000:]
        assert submit.returncode == 0, f"`ray job submit` failed:\n{log}"

        helper.stdin.write(submission_id + "\n")
        helper.stdin.flush()
        report = json.loads(helper.stdout.readline())
    finally:
        if helper.poll() is None:
            helper.stdin.close()  # EOF: the helper shuts the cluster down in its finally
            try:
                helper.wait(timeout=60)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        helper_log.close()
    leftovers = _wait_gone(ray_tmpdir)
    shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert helper.returncode == 0, f"the cluster helper failed:\n{helper_log_path.read_text()[-4000:]}"
    assert leftovers == [], f"Ray processes outlived the cluster: {leftovers}"

    assert report["job_status"] == "SUCCEEDED", f"job {submission_id} ended {report['job_status']}:\n{log}"
    assert sorted(report["nodes"]) == sorted(ready["nodes"])
    workers = report["workers"]
    assert len(workers) == 2, f"expected the 2 Ray Train workers of one attempt, found {workers}"
    assert {w["node_id"] for w in workers} == set(ready["nodes"]), \
        f"the two workers did not run one per node: {workers} on nodes {ready['nodes']}"

    run_dir = os.path.join(storage, name)
    steps = ckpt_files.list_step_dirs(run_dir)
    assert [s for s, _ in steps] == [4, STEPS], f"checkpoints in {run_dir}: {steps}"
    for _, path in steps:
        assert ckpt_files.check_complete(path) is None, ckpt_files.check_complete(path)
        assert ckpt_files.read_meta(path)["world_size"] == 2
        for rank in (0, 1):  # each node's worker wrote its own optimizer shard into the shared storage
            assert os.path.exists(os.path.join(path, f"optim_rank{rank}.pt"))
    assert "Done. Checkpoints and report in" in submit.stdout
