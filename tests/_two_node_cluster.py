"""A two-node Ray cluster on 127.0.0.1 for tests/test_multinode.py, run as its own process, and
`submit_job`, which starts it, submits one training job with the real `ray job submit` and reports.

    python tests/_two_node_cluster.py [--cpus-per-node 1] [--dry-run]

Why a helper process: the test process may already hold the session's local Ray (conftest `ray_local`), and
a process can attach to one Ray only, so this cluster lives elsewhere. Why `ray.cluster_utils.Cluster` and
not `ray start --address`: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps every socket on loopback,
the `ray start` CLI refuses to join a second node on the same machine; `Cluster.add_node` starts the same
raylet + object store a second `ray start` would, registered with the head's GCS, without the CLI's check.

Protocol (one line of JSON each way, so the test never parses logs):
  1. stdout: {"dashboard": "http://127.0.0.1:<port>", "gcs": "127.0.0.1:<port>", "nodes": [node ids]}
     once both nodes are alive and the job server answers.
  2. stdin:  a job submission id (or EOF to stop at once).
  3. stdout: {"job_status": "SUCCEEDED", "workers": [{"node_id", "state", "pid"}], "nodes": [...]} for
     the Ray Train workers (actor class RayTrainWorker) of the whole cluster, dead ones included.
  4. The cluster is shut down (in a finally) and the process exits 0.
The environment (RAY_TMPDIR, RAY_AUTH_MODE, ...) comes from the caller; nothing else is read.
"""
import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _job_agent_url(gcs) -> str | None:
    """The head node's job agent as the dashboard's JobHead finds it (ray 2.60 job_head.py
    `_get_head_node_agent_once`): the head node id under KV_HEAD_NODE_ID_KEY, then that node's agent address.
    None while either is not yet registered."""
    from ray._private import ray_constants
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    head_id = gcs.internal_kv_get(ray_constants.KV_HEAD_NODE_ID_KEY, ray_constants.KV_NAMESPACE_JOB)
    if not head_id:
        return None
    agent = gcs.internal_kv_get(f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head_id.decode()}".encode(),
                                ray_constants.KV_NAMESPACE_DASHBOARD)
    if not agent:
        return None
    ip, http_port, _ = json.loads(agent)
    return f"http://{ip}:{http_port}"


def wait_for_job_server(url: str, head_node, timeout_s: float = 90.0) -> None:
    """Block until a submitted job would be accepted. After the head's GCS, three things come up one by one:
    the dashboard's HTTP server, the head node id record, and the head's dashboard agent (which runs jobs).
    Submitting before all are up fails with "No available agent to submit job" (seen here on a loaded
    2-core machine). Ray has no public readiness call for this, so the check reads the same GCS keys the
    dashboard reads, then waits for the agent's own HTTP server to answer."""
    gcs = head_node.get_gcs_client()
    deadline = time.monotonic() + timeout_s
    while True:
        agent = _job_agent_url(gcs) if _answers(f"{url}/api/version") else None
        if agent and _answers(f"{agent}/api/healthz"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job server at {url} (dashboard + head agent {agent}) was not ready within "
                               f"{timeout_s:.0f} s; see the dashboard*.log files under $RAY_TMPDIR")
        time.sleep(0.2)


def report(url: str, submission_id: str) -> dict:
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_nodes

    status = JobSubmissionClient(url).get_job_status(submission_id)
    actors = list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         raise_on_missing_output=False)
    nodes = list_nodes(address=url, raise_on_missing_output=False)
    return {
        "job_status": str(getattr(status, "value", status)),
        "workers": [{"node_id": a.node_id, "state": a.state, "pid": a.pid} for a in actors],
        "nodes": sorted(n.node_id for n in nodes),
    }


def wait_gone(ray_tmpdir: str, timeout_s: float = 60.0) -> list[int]:
    """Ray's worker processes exit on their own once their raylet is gone, which takes seconds on a loaded
    machine: poll rather than check once. Returns the pids still running."""
    from conftest import ray_processes

    deadline = time.monotonic() + timeout_s
    while (left := ray_processes(ray_tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _raylets(ray_tmpdir: str) -> list[int]:
    from conftest import ray_processes

    def program(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return os.path.basename(f.read().split(b"\0")[0].decode())
        except OSError:
            return ""

    return [pid for pid in ray_processes(ray_tmpdir) if program(pid) == "raylet"]


@dataclasses.dataclass
class Job:
    ready: dict  # the helper's first line: dashboard, gcs, node ids
    raylets: list  # the pids of the cluster's raylets, seen once it was up
    submit: subprocess.CompletedProcess  # `ray job submit` (it waits for the job and prints its output)
    report: dict  # the helper's report: job status, Ray Train workers with their nodes
    leftovers: list  # pids of Ray processes still running a minute after the cluster was shut down

    @property
    def log(self) -> str:
        return self.submit.stdout[-6000:] + self.submit.stderr[-3000:]


def submit_job(env: dict, train_args: list, submission_id: str, job_env_vars: dict, log_path) -> Job:
    """Start the two-node cluster (in a helper process, with `env`, whose RAY_TMPDIR must be private and short),
    run `ray job submit --working-dir . -- python -m raychat.train *train_args` on it as a user would, collect
    the report and shut the cluster down. The job's processes get `job_env_vars`."""
    bindir = os.path.dirname(sys.executable)
    # The job's entrypoint `python` is resolved by the head node's shell: make it this venv's python.
    env = {**env, "PATH": bindir + os.pathsep + env.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)  # the helper starts a cluster; it must not attach to another one
    # The helper's stderr (Ray's own logging) goes to a file: a pipe nobody drains could fill and stall it.
    with open(log_path, "w") as helper_log:
        helper = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--cpus-per-node", "1"], cwd=REPO,
                                  env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=helper_log)
        try:
            ready_line = helper.stdout.readline()
            assert ready_line, f"the cluster helper exited early:\n{open(log_path).read()[-4000:]}"
            ready = json.loads(ready_line)
            raylets = _raylets(env["RAY_TMPDIR"])
            submit = subprocess.run(
                [os.path.join(bindir, "ray"), "job", "submit", "--address", ready["dashboard"], "--submission-id",
                 submission_id, "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": job_env_vars}),
                 "--", "python", "-m", "raychat.train", *train_args],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            assert submit.returncode == 0, f"`ray job submit` failed:\n{submit.stdout[-6000:]}{submit.stderr[-3000:]}"
            helper.stdin.write(submission_id + "\n")
            helper.stdin.flush()
            report_line = json.loads(helper.stdout.readline())
        finally:
            if helper.poll() is None:
                helper.stdin.close()  # EOF: the helper shuts the cluster down in its finally
                try:
                    helper.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    helper.kill()
                    helper.wait()
    assert helper.returncode == 0, f"the cluster helper failed:\n{open(log_path).read()[-4000:]}"
    return Job(ready, raylets, submit, report_line, wait_gone(env["RAY_TMPDIR"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus-per-node", type=int, default=1,
                        help="logical CPUs per node: 1 forces two 1-CPU workers onto different nodes")
    parser.add_argument("--dry-run", action="store_true", help="validate the flags, print them, start nothing")
    args = parser.parse_args()
    if args.cpus_per_node < 1:
        parser.error(f"--cpus-per-node={args.cpus_per_node}: must be >= 1 (a Train worker needs a CPU)")
    if args.dry_run:
        print(f"two nodes on 127.0.0.1, {args.cpus_per_node} CPU(s) each, dashboard on a free port")
        return 0

    from ray.cluster_utils import Cluster

    port = free_port()
    # The head's dashboard agent (which runs submitted jobs) listens on 52365 by default, as does that of
    # every other Ray on this machine (other test sessions): a fixed port loses the race at random and the
    # job server never becomes ready. Cluster.add_node already gives non-head nodes a random one.
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
        "num_cpus": args.cpus_per_node, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": port, "dashboard_agent_listen_port": free_port()})
    try:
        cluster.add_node(num_cpus=args.cpus_per_node, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        url = f"http://127.0.0.1:{port}"
        wait_for_job_server(url, cluster.head_node)
        nodes = [cluster.head_node.node_id] + [n.node_id for n in cluster.worker_nodes]
        print(json.dumps({"dashboard": url, "gcs": cluster.gcs_address, "nodes": nodes}), flush=True)
        submission_id = sys.stdin.readline().strip()
        if submission_id:
            print(json.dumps(report(url, submission_id)), flush=True)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
