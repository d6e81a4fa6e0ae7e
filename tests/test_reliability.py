"""The fault matrix of docs/RELIABILITY.md, for the faults that need Ray: each on a real local Ray (2 gloo CPU
workers, a tiny fp32 model, tinyshakespeare shards), each run compared tensor for tensor with one uninterrupted
run. The faults the loop handles by itself (a non-finite loss, damaged or incomplete checkpoints, changed
settings, a full storage) are tested without Ray in test_loop.py.

Faults come from the loop's own hooks (`--debug-fail-kind`, raychat.faults), which make a worker really die
(os._exit / SIGKILL of its own process) at a chosen point, or from the outside: the test kills the driver's
process group. Driver tests run in subprocesses: they need their own Ray (one `ray.init` per process). A node's
loss is tested on a two-node cluster in tests/test_elastic.py.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from conftest import STEPS, assert_same_run, reap_ray, tiny_args
from raychat import checkpoint as ckpt_files
from raychat.train import main
from tests._s3 import driver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fault_args(data_dir, tok_dir, storage, name, *extra):
    """The shared tiny 2-worker run (conftest.tiny_args), tokens packed in the worker."""
    return tiny_args(data_dir, tok_dir, storage, name, "--num-workers", "2", "--data-backend", "inline", *extra)


# ----------------------------------------------------------------------------------------------------
# 1. A worker SIGKILLed in the middle of a step: the shared S3 run (tests/_s3.py `s3_run`, checked in
# tests/test_s3.py) is this fault, rank 1 at step 10, compared with the baseline tensor for tensor; a second
# run of it on local disk would cost a Ray Train start and test nothing more.


# ----------------------------------------------------------------------------------------------------
# 2. A worker killed while a checkpoint is being written


@pytest.mark.slow
def test_worker_killed_while_checkpoint_is_written(baseline, tiny_data_dir, tiny_tokenizer_dir, storage):
    """Rank 0 (the master) writes its step-8 files (model, meta, optimizer shard) locally and is SIGKILLed
    before they are persisted, while rank 1 persists its own: storage may hold a step_000008 with rank 1's files
    only. That directory never counts as a checkpoint (no meta.json, no done_rank0.json); Ray Train restarts
    both workers, which resume from step 4 and rewrite step 8 in full."""
    args = fault_args(tiny_data_dir, tiny_tokenizer_dir, storage, "killckpt", "--max-failures", "1",
                     "--debug-fail-at-step", "8", "--debug-fail-kind", "kill-in-checkpoint")
    assert main(args) == 0
    run = os.path.join(storage, "killckpt")
    assert os.path.exists(os.path.join(run, ".injected_failure_step8")), "the fault never fired"
    assert [s for s, _ in ckpt_files.list_step_dirs(run)] == [4, 8, 12, 16]
    for step in (8, STEPS):
        assert_same_run(run, baseline, step)


def _two_rank_checkpoint(directory):
    """A complete checkpoint as 2 ranks write it: rank 0 adds the model and meta.json."""
    optim = {"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": [{"params": [0]}]}
    ckpt_files.save_rank_files(directory, 0, optim, [{"slot": 0}], model_state={"w": torch.zeros(4)},
                               meta={"step": 8, "world_size": 2})
    ckpt_files.save_rank_files(directory, 1, optim, [{"slot": 1}])
    return directory


def test_partial_checkpoint_of_one_rank_is_never_resumed(tmp_path):
    """What storage can hold after fault 2 (only the surviving ranks' files), and worse, is not a checkpoint."""
    from raychat.runs import first_complete

    src = _two_rank_checkpoint(str(tmp_path / "complete"))
    assert ckpt_files.check_complete(src) is None
    cases = {
        "rank1_only": ["optim_rank1.pt", "data_rank1.json", "done_rank1.json"],
        "no_done_rank0": ["model.pt", "meta.json", "optim_rank0.pt", "data_rank0.json", "optim_rank1.pt",
                          "data_rank1.json", "done_rank1.json"],
        "no_done_rank1": ["model.pt", "meta.json", "optim_rank0.pt", "data_rank0.json", "done_rank0.json"],
    }
    for name, files in cases.items():
        d = tmp_path / name
        d.mkdir()
        for f in files:
            shutil.copy(os.path.join(src, f), d / f)
        problem = ckpt_files.check_complete(str(d))
        assert problem is not None, f"{name} passed as complete"
        with pytest.raises(RuntimeError, match="incomplete"):
            ckpt_files.load_rank_state(str(d), 0, 1, "cpu")
    logged = []
    with first_complete([str(tmp_path / n) for n in cases] + [src], logged.append) as chosen:
        assert chosen == src
    assert len(logged) == 3 and all(m.startswith("WARNING: skipping incomplete checkpoint") for m in logged)


# ----------------------------------------------------------------------------------------------------
# 3. The driver killed, the same command rerun: one test with Ctrl-C (docs/RELIABILITY.md row 11), section 5


def _subprocess_env(ray_tmp):
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _descendants(pid):
    """`pid` and every process below it (a local Ray's GCS, raylet and the worker processes they start)."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


# ----------------------------------------------------------------------------------------------------
# 4. A node of a two-node cluster removed mid-run: tests/test_elastic.py's cluster run loses both its nodes, one
#    after the other, and waits for capacity when none is left (docs/RELIABILITY.md row 4)


# ----------------------------------------------------------------------------------------------------
# 5. Ctrl-C and kill -9 of the driver: the embedded Ray and its workers end with it, the same command resumes


def _start_times(pids):
    """{pid: start time} of the processes still running among `pids`."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                found[pid] = f.read().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            pass
    return found


def _survivors(started):
    return [pid for pid, t in _start_times(started).items() if started[pid] == t]


def _wait_until_gone(started, hang_s=60):
    """Poll until none of `started` runs any more; gives up after `hang_s` (a hang, not a slow exit)."""
    deadline = time.time() + hang_s
    while _survivors(started) and time.time() < deadline:
        time.sleep(0.2)


def _complete_steps(run):
    return {s for s, p in ckpt_files.list_step_dirs(run) if ckpt_files.check_complete(p) is None}


def _wait_for(proc, log_path, ready, what, timeout=240):
    """Poll until `ready()`; the driver ending first (the run finished too early to be interrupted) fails."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}:\n{log_path.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def _ends_with_everything_it_started(proc, signum):
    """Send `signum` to the driver alone (not its process group) and check that every process below it (Ray's
    GCS, raylet, agents, the training workers) ends too: the exit code. (The waits only bound a hang.)"""
    started = _start_times(_descendants(proc.pid))
    assert len(started) > 5, f"expected a Ray session below the driver, found {len(started)} processes"
    try:
        os.kill(proc.pid, signum)
        rc = proc.wait(timeout=120)
        _wait_until_gone(started)
        assert not _survivors(started), f"still running after the driver ended: {_survivors(started)}"
        return rc
    finally:
        for pid in _survivors(started):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_ctrl_c_and_kill_9_end_everything_the_driver_started_and_the_same_command_resumes(
        baseline, tiny_data_dir, tiny_tokenizer_dir, storage, tmp_path):
    """One command, `python -m raychat.train` with its own embedded Ray, run up to three times while a second
    `ray start --head` (own ports on 127.0.0.1, own temp dir) runs on the machine:

    1. kill -9 of the driver alone (not its process group) once the step-4 checkpoint is complete: every
       process it started ends too, and no checkpoint is written after the one that may have been in flight.
    2. The same command takes over the run (the dead driver's lease) and resumes; once its workers have
       resumed, Ctrl-C (SIGINT): exit 130 with a message saying how to resume, every process it started gone.
       Ray Train's placement-group cleaner never fails with "Found multiple active Ray instances" (it is
       pointed at the embedded Ray's own dashboard).
    3. Unless the workers finished the 16 steps before the Ctrl-C's abort reached them (it takes some hundreds
       of milliseconds, 50 ms a step here: it happens), the same command resumes from the newest checkpoint.
       The run ends bit-identical to the uninterrupted one."""
    run = os.path.join(storage, "driver")
    cmd = [sys.executable, "-m", "raychat.train", *fault_args(tiny_data_dir, tiny_tokenizer_dir, storage, "driver")]
    other_tmp = tempfile.mkdtemp(prefix="ro", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    other = subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", "0",
                            "--num-cpus", "1", "--include-dashboard", "false", "--temp-dir", other_tmp,
                            "--disable-usage-stats"], env=_subprocess_env(other_tmp), capture_output=True, text=True,
                           timeout=120)
    ray_tmps, proc = [], None

    def start(name):
        ray_tmps.append(tempfile.mkdtemp(prefix="rk", dir="/tmp"))
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "w") as log:  # the driver writes through its own copy of the descriptor
            return subprocess.Popen(cmd, cwd=REPO, env=_subprocess_env(ray_tmps[-1]), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True), log_path

    try:
        assert other.returncode == 0, other.stdout + other.stderr
        proc, log_path = start("kill_9")
        first = os.path.join(run, "step_000004")
        _wait_for(proc, log_path, lambda: os.path.isdir(first) and ckpt_files.check_complete(first) is None,
                  "a complete step-4 checkpoint")
        before = _complete_steps(run)
        assert _ends_with_everything_it_started(proc, signal.SIGKILL) == -signal.SIGKILL
        time.sleep(3)
        new = _complete_steps(run) - before
        assert new <= {max(before) + 4}, f"checkpoints written after the driver died: {sorted(new)}"
        newest = max(_complete_steps(run))
        assert newest < STEPS, f"the kill came too late to test anything: complete steps {_complete_steps(run)}"

        proc, log_path = start("ctrl_c")
        _wait_for(proc, log_path, lambda: f"Resuming from step {newest}" in log_path.read_text(),
                  "the workers' resume")
        assert _ends_with_everything_it_started(proc, signal.SIGINT) == 130, log_path.read_text()[-3000:]
        log = log_path.read_text()
        assert "error: interrupted; the checkpoints written so far are kept" in log
        assert "Found multiple active Ray instances" not in log
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for ray_tmp in ray_tmps:
            reap_ray(ray_tmp, timeout=0)
        reap_ray(other_tmp, timeout=0)  # that head's processes only (by its temp dir), never `ray stop`
        for d in (*ray_tmps, other_tmp):
            shutil.rmtree(d, ignore_errors=True)
    steps = sorted(_complete_steps(run))
    if max(steps) < STEPS:
        code, out = driver(cmd[3:], {})
        (tmp_path / "again.log").write_text(out)
        assert code == 0, out[-3000:]
        assert f"Resuming from step {max(steps)}" in out
    assert_same_run(run, baseline)
