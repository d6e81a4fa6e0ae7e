"""The embedded local Ray dies with its driver, whatever kills the driver (`python raychat/reaper.py PID`).

Ray fate-shares only its GCS and raylet with the driver that started them (PR_SET_PDEATHSIG); after a
`kill -9` of the driver, the raylet's children live on under PID 1: the training workers keep training and
writing checkpoints, the dashboard and runtime-env agents stay forever (docs/RELIABILITY.md). So the driver
starts this small process first, holding the write end of a pipe as its stdin. While the driver lives the
reaper records the driver's process tree, every half second while Ray starts and every 5 s after; when the pipe
closes (the driver exited or was killed: the kernel closes its descriptors either way) it SIGKILLs every
recorded process still running and every process below them (the workers a raylet started since the last
look), found by pid and start time so that a reused pid is never hit, and exits. The slow pace matters on a
small machine: a scan of /proc twice a second took 0.5% of a CPU from the training threads.
"""
import os
import select
import signal
import sys
import time

POLL_S = 0.5  # while the driver starts Ray, its training actors and their workers
SLOW_POLL_S = 5.0
SETTLE_S = float(os.environ.get("RAYCHAT_REAPER_SETTLE_S", 60))  # the tests shorten it


def _process_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every process, from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(name)] = (int(fields[1]), fields[19])  # ppid, starttime (clock ticks since boot)
    return table


def _descendants(roots: list[int], table: dict) -> dict[int, str]:
    """{pid: start time} of every process below any of `roots`."""
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [c for root in roots for c in children.get(root, [])]
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo += children.get(pid, [])
    return found


def reap(driver: int) -> int:
    seen = {}  # pid -> start time: every process that was ever below the driver
    started = time.monotonic()
    while True:
        table = _process_table()
        seen.update(_descendants([driver], table))
        seen.pop(os.getpid(), None)
        wait = POLL_S if time.monotonic() - started < SETTLE_S else SLOW_POLL_S
        if select.select([sys.stdin], [], [], wait)[0] and not os.read(sys.stdin.fileno(), 1):
            break  # EOF: the driver is gone
    table = _process_table()
    # Below the driver and below every recorded process still alive: children started since the last scan.
    live = [pid for pid, start in seen.items() if pid in table and table[pid][1] == start]
    seen.update(_descendants([driver, *live], table))
    seen.pop(os.getpid(), None)
    killed = 0
    for pid, start in seen.items():
        if pid in table and table[pid][1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: outlive the driver
    reap(int(sys.argv[1]))
