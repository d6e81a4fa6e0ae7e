"""raychat's own Ray on this machine (the embedded default), or a cluster to attach to: one decision for the
train, tune and eval drivers and for every process they start.

With RAY_ADDRESS set (`ray job submit` sets it) a driver attaches to that cluster with a plain `ray.init()`.
Otherwise it starts a local Ray (`start`) sized for the run, and marks it: the marker is in the environment
that the Ray's own processes (raylet, Train controller and workers, Tune trials) inherit from the driver, so
each of them answers `is_embedded()` as the driver does. A Ray started by someone else (a test fixture, a
script's own `ray.init`) counts as a cluster: raychat did not size it.

Nothing here imports Ray at module level: `resolve_auto` serves the loop without Ray too.
"""
import dataclasses
import math
import os
import subprocess
import sys

_MARKER = "RAYCHAT_EMBEDDED_RAY"
_STARTED = []  # the GCS address of the Ray this process started


def is_embedded() -> bool:
    """Whether this process's Ray is raychat's own on this machine: in one of its processes, in the driver that
    started it, or in a driver that will start it (no RAY_ADDRESS and no Ray connected yet)."""
    if os.environ.get(_MARKER) == "1":
        return True
    import ray

    if not ray.is_initialized():
        return not os.environ.get("RAY_ADDRESS")
    return ray.get_runtime_context().gcs_address in _STARTED


def resolve_auto(cfg, local: bool, cpus: int):
    """The TrainConfig's `auto` values that depend on where the run goes (`local`: raychat's own Ray, or no
    Ray at all, on this machine's `cpus`).

    --cpus-per-worker 0: locally the machine's CPUs shared among the workers (1 worker on 2 cores gets both:
    1.7x the tokens/s of 1 thread at d4, docs/LOG.md); on a cluster it attaches to, 1 (a GPU worker needs few;
    pass --cpus-per-worker to reserve more).
    --data-backend auto: inline when the local workers take every CPU, since Ray Data's actors and its
    scheduling thread could then only run on the training threads' cores (d4 on 2 cores: 0.70x nanochat's
    tokens/s with Ray Data against 0.87x inline, docs/LOG.md); Ray Data wherever CPUs are left for it."""
    if cfg.cpus_per_worker <= 0:
        cfg = dataclasses.replace(cfg, cpus_per_worker=float(max(1, cpus // cfg.num_workers)) if local else 1.0)
    if cfg.data_backend == "auto":
        spare = not local or cfg.num_workers * cfg.cpus_per_worker < cpus
        cfg = dataclasses.replace(cfg, data_backend="ray" if spare else "inline")
    return cfg


def init(cpus_needed: float) -> None:
    """Connect this driver to Ray: RAY_ADDRESS's cluster, else a local Ray with at least `cpus_needed` CPUs;
    nothing when it is connected already."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # no resource arguments: they raise against an existing cluster
        return
    start(cpus_needed)


def start(cpus_needed: float) -> None:
    """Start the embedded Ray: as many logical CPUs as the machine has, more if the run needs them (logical
    CPUs may exceed cores; the workers' torch threads are capped by --cpus-per-worker)."""
    import ray

    # One machine has no other node to lose: Ray Train's preemption watcher would watch nothing, and its
    # actor logs an error at every start (its arguments live in the object store, ray#53727).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    start_reaper()
    # The dashboard (on 127.0.0.1 only) serves the state API, which Ray Train's placement group cleaner polls
    # (in a Tune trial too): without it every poll logs a warning. The cleaner and the state API find "the"
    # local Ray by scanning this machine's processes and fail at every start when another Ray runs here
    # ("Found multiple active Ray instances"): point them at this Ray's own dashboard, through the
    # environment every process of this Ray inherits from the driver.
    port = _free_loopback_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ[_MARKER] = "1"
    try:
        # No idle workers prestarted for the driver: Ray Train's controller and workers each carry a runtime
        # env of their own, so they never take one, and the two that Ray starts here would only hold memory
        # and wake on the training threads' cores.
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)), include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port,
                 _system_config={"prestart_worker_first_driver": False})
    finally:
        # Ray's processes have the marker now; a process this driver starts later (a test's own cluster)
        # must not inherit it. This driver is recognised by the GCS address.
        del os.environ[_MARKER]
    _STARTED.append(ray.get_runtime_context().gcs_address)


def torch_config(timeout_s: int):
    """The process group setup (raychat.rendezvous: an NCCL group bound to each worker's GPU): on the embedded
    Ray every worker is on this machine, so the rendezvous listens on 127.0.0.1 only; on a cluster it is Ray
    Train's, on rank 0's node."""
    from raychat.rendezvous import DeviceTorchConfig, LoopbackTorchConfig

    return (LoopbackTorchConfig if is_embedded() else DeviceTorchConfig)(timeout_s=timeout_s)


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REAPER_PIPE = []  # the write end, open for this process's lifetime: its closing tells the reaper


def start_reaper() -> None:
    """The embedded Ray's processes die with this driver, even under kill -9 (raychat/reaper.py)."""
    from raychat import reaper

    read, write = os.pipe()  # not inherited by Ray's processes (O_CLOEXEC), so only this process holds `write`
    subprocess.Popen([sys.executable, reaper.__file__, str(os.getpid())], stdin=read)  # stdlib only: no imports
    os.close(read)
    _REAPER_PIPE.append(write)
