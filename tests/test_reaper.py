"""raychat/reaper.py on a process tree of its own: a "driver" that starts the reaper and a "raylet" child, which
starts a "worker" only after the reaper has slowed to its 5 s pace (so no scan saw the worker), then the driver
is SIGKILLed. Every process below the driver, the late worker too, must die within seconds."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from raychat import reaper

DRIVER = textwrap.dedent("""
    import os, subprocess, sys, time
    read, write = os.pipe()
    subprocess.Popen([sys.executable, sys.argv[1], str(os.getpid())], stdin=read)
    os.close(read)
    raylet = subprocess.Popen([sys.executable, "-c", sys.argv[2]])
    print(raylet.pid, flush=True)
    time.sleep(600)
""")
# The "raylet": on SIGUSR1 it starts a "worker" and writes the worker's pid to `pidfile`.
RAYLET = textwrap.dedent("""
    import signal, subprocess, sys, time
    def spawn(*_):
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open("{pidfile}", "w").write(str(worker.pid))
    signal.signal(signal.SIGUSR1, spawn)
    while True:
        time.sleep(1)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_driver_killed_takes_its_tree_and_workers_started_late(tmp_path):
    pidfile = tmp_path / "worker.pid"
    env = {**os.environ, "RAYCHAT_REAPER_SETTLE_S": "0.5"}  # fast scans for 0.5 s (they see the raylet), then 5 s
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, reaper.__file__, RAYLET.format(pidfile=pidfile)],
                              stdout=subprocess.PIPE, text=True, env=env)
    raylet = int(driver.stdout.readline())
    time.sleep(1.5)  # past the fast scans: the reaper's next look is seconds away
    os.kill(raylet, signal.SIGUSR1)
    deadline = time.time() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < deadline, "the raylet did not start its worker"
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    assert _alive(worker)
    t0 = time.time()
    driver.kill()
    driver.wait()
    while (_alive(raylet) or _alive(worker)) and time.time() - t0 < 3:
        time.sleep(0.05)
    try:
        assert not _alive(raylet) and not _alive(worker), "the reaper left the driver's tree running"
    finally:
        for pid in (raylet, worker):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
