"""One driver per run: a lease file in the run directory, `{storage}/{run_name}/driver_lease.json`.

A training driver holds the lease while it runs: an owner id, its host, pid and the pid's start time, and a
heartbeat time that a thread renews every TTL/4. A second driver on the same run is refused at once, naming
the live one, since both would write checkpoints into one directory and interleave them. A lease is taken
over, with a message, when its driver is gone: its heartbeat is older than the TTL (a driver killed with -9
on another machine, a lost head node), or it was held on this same host by a process that no longer runs.

No file locks: object stores have none. Taking the lease is write, wait, read back: of two drivers that
write at nearly the same time the later write wins, and the earlier one sees that when it reads back after
the settle time (longer than one write takes) and gives up. It relies on read-after-write consistency,
which local disks, S3 and GCS give. Heartbeat ages compare the writer's clock with the reader's: the
machines' clocks must agree to well within the TTL (NTP does).
"""
import json
import os
import socket
import threading
import time
import uuid

from raychat import storage

LEASE_FILE = "driver_lease.json"


def ttl_s() -> float:
    """Seconds without a heartbeat after which a lease counts as abandoned (RAYCHAT_LEASE_TTL_S, default 60)."""
    return float(os.environ.get("RAYCHAT_LEASE_TTL_S", 60))


class RunBusy(ValueError):
    """Another live driver holds the run."""


def _pid_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc), to tell it from a later one that
    reuses its pid; None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _gone(held: dict) -> bool:
    """Whether the lease's process is known to be gone: only decidable on its own host."""
    if held.get("host") != socket.gethostname():
        return False
    pid = held.get("pid")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError):
        return False
    return held.get("pid_start") is not None and _pid_start(pid) != held["pid_start"]


def describe(held: dict) -> str:
    age = time.time() - held.get("heartbeat", 0)
    return (f"the driver pid {held.get('pid')} on host {held.get('host')} (started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.get('started', 0)))}, heartbeat {age:.0f} s ago)")


class Lease:
    """The lease of one run directory, held by this process. `acquire` takes it (or raises RunBusy), `release`
    gives it back; in between a daemon thread renews the heartbeat."""

    def __init__(self, run_dir: str, run_name: str, log=print):
        self.run_dir, self.run_name, self.log = run_dir, run_name, log
        self.path = storage.join(run_dir, LEASE_FILE)
        self.fs, self.fs_path = storage.filesystem(self.path)
        self.ttl = ttl_s()
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": _pid_start(os.getpid()), "started": time.time(), "heartbeat": time.time(),
                       "ttl_s": self.ttl}
        self._stop = threading.Event()
        self._thread = None

    @classmethod
    def acquire(cls, run_dir: str, run_name: str, log=print, settle_s: float | None = None) -> "Lease":
        lease = cls(run_dir, run_name, log)
        held = lease.read()
        if held is not None and held.get("owner") != lease.record["owner"]:
            lease._refuse_unless_abandoned(held)
        try:
            lease._write()
        except OSError as e:
            raise ValueError(f"run {run_name}: its directory {run_dir} cannot be written "
                             f"({storage.explain(e, run_dir)}); pass a writable --storage-path") from None
        # Read back after a wait longer than a write takes: a driver that wrote after us has won.
        time.sleep(settle_s if settle_s is not None else (1.0 if storage.is_remote(run_dir) else 0.2))
        held = lease.read()
        if held is None or held.get("owner") != lease.record["owner"]:
            raise RunBusy(f"run {run_name} ({run_dir}) was taken by another driver while this one started"
                          + (f": {describe(held)}" if held else "") + "; only one driver may train a run")
        lease._thread = threading.Thread(target=lease._renew, name="raychat-run-lease", daemon=True)
        lease._thread.start()
        return lease

    def _refuse_unless_abandoned(self, held: dict) -> None:
        age = time.time() - held.get("heartbeat", 0)
        if _gone(held):
            self.log(f"Run {self.run_name}: taking over the lease of {describe(held)}: that process is gone")
        elif age > held.get("ttl_s", self.ttl):
            self.log(f"Run {self.run_name}: taking over the lease of {describe(held)}: no heartbeat for more "
                     f"than {held.get('ttl_s', self.ttl):g} s, so that driver is gone")
        else:
            wait = held.get("ttl_s", self.ttl) - age
            raise RunBusy(f"run {self.run_name} is being trained by {describe(held)}: a second driver would "
                          f"interleave its checkpoints with it in {self.run_dir}. Wait for that run to end or stop "
                          f"it (`ray job stop`, or `kill {held.get('pid')}` on {held.get('host')}); a driver that "
                          f"died without ending is taken over once its heartbeat is {held.get('ttl_s', self.ttl):g} s "
                          f"old (in {max(wait, 0):.0f} s). To train a separate run, pass another --run-name")

    def read(self) -> dict | None:
        """The lease as stored, or None when there is none (or it is unreadable: a torn local write)."""
        try:
            with self.fs.open_input_stream(self.fs_path) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, ValueError):
            return None

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        data = json.dumps(self.record).encode()
        if storage.is_remote(self.run_dir):  # an object PUT is atomic
            if self._thread is None:  # the first write: the run's "directory" may not exist yet
                self.fs.create_dir(self.fs_path.rpartition("/")[0], recursive=True)
            with self.fs.open_output_stream(self.fs_path) as f:
                f.write(data)
            return
        os.makedirs(self.run_dir, exist_ok=True)
        tmp = f"{self.fs_path}.{self.record['owner']}.tmp"  # a rename: readers never see half a file
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.fs_path)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                held = self.read()
                if held is not None and held.get("owner") != self.record["owner"]:
                    self.log(f"ERROR: run {self.run_name}: the lease was taken over by {describe(held)} (this "
                             "driver's heartbeats did not reach the storage for longer than the TTL); stopping "
                             "this driver so that the two do not interleave checkpoints")
                    import _thread

                    _thread.interrupt_main()
                    return
                self._write()
            except OSError as e:  # the storage is away for a while: the next heartbeat tries again
                self.log(f"WARNING: run {self.run_name}: renewing the driver lease failed: {storage.explain(e, self.path)}")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self.read()
            if held is not None and held.get("owner") == self.record["owner"]:
                self.fs.delete_file(self.fs_path)
            if not storage.is_remote(self.run_dir):
                os.rmdir(self.run_dir)  # only if empty: a run refused before it wrote anything leaves nothing
        except OSError:
            pass  # left behind, a lease is taken over once its heartbeat is old
