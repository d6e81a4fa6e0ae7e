"""Where the training loop meets its launcher: Ray Train, or a plain Python process.

The loop (raychat/loop.py) talks to a session for four things only: its rank and world size, its device,
the checkpoint to resume from, and reporting metrics and checkpoints. `RayTrainSession` is what a Ray Train
worker uses; `LocalSession` runs the same loop in one process without Ray (benchmarks, debugging).
"""
import contextlib
import errno
import json
import os
import shutil
import tempfile

import torch

from raychat import checkpoint as ckpt_files


def run_dir(cfg) -> str:
    return f"{cfg.storage_path.rstrip('/')}/{cfg.run_name}"


def _materialise(path: str):
    """A context manager giving a local directory with the checkpoint at `path` (local or s3://, gs://)."""
    if "://" not in path:
        return contextlib.nullcontext(path)
    import ray.train

    return ray.train.Checkpoint(path).as_directory()


def list_run_steps(path: str) -> list[tuple[int, str]]:
    import pyarrow.fs as pafs

    if "://" not in path:
        return ckpt_files.list_step_dirs(path)
    fs, root = pafs.FileSystem.from_uri(path)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        m = ckpt_files.STEP_DIR.match(os.path.basename(info.path))
        if m and info.type == pafs.FileType.Directory:
            found.append((int(m.group(1)), path.rstrip("/") + "/" + os.path.basename(info.path)))
    return sorted(found)


@contextlib.contextmanager
def first_complete(candidates, log):
    """Yield the local directory of the first complete checkpoint among `candidates` (newest first)."""
    for path in candidates:
        with _materialise(path) as d:
            problem = ckpt_files.check_complete(d)
            if problem is None:
                yield d
                return
            log(f"WARNING: skipping incomplete checkpoint {path}: {problem}")
    yield None


@contextlib.contextmanager
def resume_checkpoint(cfg, fit_id: str | None = None, log=print):
    """The local directory of the checkpoint a run continues from, or None for a fresh start.

    Precedence: a checkpoint written earlier in this same `fit()` (`fit_id`: automatic recovery after a
    failure); else `--resume-from-step N` of this run; else the newest complete checkpoint of the run (rerun
    with the same --run-name). Incomplete or corrupt checkpoints (checkpoint.check_complete) are skipped with a
    warning. The driver's preflight (no fit yet) and every worker choose through this one function.
    """
    steps = list_run_steps(run_dir(cfg))
    newest_first = [p for _, p in reversed(steps)]
    if cfg.resume_from_step >= 0:
        explicit = [p for s, p in steps if s == cfg.resume_from_step]
        if not explicit:
            raise FileNotFoundError(f"--resume-from-step {cfg.resume_from_step}: no checkpoint "
                                    f"{ckpt_files.step_dir_name(cfg.resume_from_step)} in {run_dir(cfg)}; "
                                    f"found steps {[s for s, _ in steps]}")
        # Only checkpoints of this very fit() (a retry after a failure) take precedence over it.
        same_fit = [p for s, p in steps if s > cfg.resume_from_step and _fit_id_of(p) == fit_id] if fit_id else []
        newest_first = list(reversed(same_fit)) + explicit
    with first_complete(newest_first, log) as d:
        if d is None and cfg.resume_from_step >= 0:
            # A fresh start would silently discard the step the user asked for.
            raise ValueError(f"--resume-from-step {cfg.resume_from_step}: checkpoint {newest_first[-1]} is "
                             "incomplete or corrupt (see the warning above); pick another step of this run")
        yield d


def _fit_id_of(path: str):
    try:
        with _materialise(path) as d:
            return ckpt_files.read_meta(d).get("fit_id")
    except (OSError, ValueError):
        return None


class _Session:
    rank = 0
    world_size = 1

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def resume_checkpoint(self, cfg, fit_id: str):
        return resume_checkpoint(cfg, fit_id, self.log)


class RayTrainSession(_Session):
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def device(self, device_type: str) -> torch.device:
        if device_type == "cuda":
            import ray.train.torch

            return ray.train.torch.get_device()  # not cuda:LOCAL_RANK: Ray shares CUDA_VISIBLE_DEVICES
        return torch.device(device_type)

    def _storage_step(self, step: int):
        import ray.train

        storage = ray.train.get_context().get_storage()  # Ray's own view of {storage_path}/{run_name}
        return storage.storage_filesystem, storage.build_checkpoint_path_from_name(ckpt_files.step_dir_name(step))

    def persist(self, checkpoint_dir: str, step: int) -> None:
        """Copy this rank's files of a checkpoint to storage, on the writer thread (so behind the next steps, as
        Ray's ASYNC upload was): a failure surfaces in the loop, which decides between stopping and a retry,
        instead of in Ray's upload thread, whose every error restarts the group (into the same full disk)."""
        fs, dest = self._storage_step(step)
        copy_to_storage(checkpoint_dir, fs, dest)

    def discard(self, step: int) -> None:
        """Delete a checkpoint directory whose persisting failed, so no half-written step stays behind."""
        fs, dest = self._storage_step(step)
        _delete_quietly(fs, dest)

    def report(self, metrics: dict, checkpoint_dir: str | None, step: int) -> None:
        """Every rank calls this at the same steps: it is a barrier (RAY_PRACTICE §1). A checkpoint is already
        in storage (persist), so Ray only registers it (NO_UPLOAD)."""
        import ray.train

        checkpoint = None
        if checkpoint_dir:
            fs, dest = self._storage_step(step)
            checkpoint = ray.train.Checkpoint(path=dest, filesystem=fs)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=ckpt_files.step_dir_name(step) if checkpoint_dir else None,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


class LocalSession(_Session):
    """The same loop in the calling process, checkpoints copied into `{storage_path}/{run_name}/`."""

    def __init__(self, cfg=None):
        self.run_dir = run_dir(cfg) if cfg is not None else None  # None: nothing to resume or save (eval)
        self.reports = []

    def device(self, device_type: str) -> torch.device:
        return torch.device(device_type)

    def persist(self, checkpoint_dir: str, step: int) -> None:
        import pyarrow.fs as pafs

        dest = os.path.join(self.run_dir, ckpt_files.step_dir_name(step))
        copy_to_storage(checkpoint_dir, pafs.LocalFileSystem(), dest)

    def discard(self, step: int) -> None:
        import pyarrow.fs as pafs

        _delete_quietly(pafs.LocalFileSystem(), os.path.join(self.run_dir, ckpt_files.step_dir_name(step)))

    def report(self, metrics: dict, checkpoint_dir: str | None, step: int) -> None:
        self.reports.append(dict(metrics))


# Storage errors a restart would meet again: the run stops (raychat.loop) rather than retry into them.
LASTING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class StorageError(RuntimeError):
    """A checkpoint could not be persisted for a lasting reason (LASTING_ERRNOS): full, read-only, too big."""

    def __init__(self, msg: str, errno_: int):
        super().__init__(msg)
        self.errno = errno_


def free_bytes(path: str) -> int | None:
    """Free space under a local storage path (its nearest existing parent), None for s3:// and gs://."""
    if "://" in path:
        return None
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def copy_to_storage(local_dir: str, fs, dest: str) -> None:
    """Copy a local checkpoint directory's files into `dest` on `fs` (local, s3, gs); the local copy is deleted
    either way. Files already in `dest` from other ranks stay; a rewrite of the same step replaces this rank's files."""
    import pyarrow.fs as pafs

    try:
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(local_dir, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        if e.errno not in LASTING_ERRNOS:
            raise
        raise StorageError(f"{dest}: {os.strerror(e.errno)}", e.errno) from e
    finally:
        # Failed or not, the local copy is done with: a stop or a restart resumes from storage, never from it.
        shutil.rmtree(local_dir, ignore_errors=True)


def _delete_quietly(fs, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass


STOP_FILE = "stopped.json"


def _run_fs(cfg):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(run_dir(cfg))  # a local path, s3:// and gs:// alike


def write_stop(cfg, reason: str) -> None:
    """Rank 0 records why training stopped early (a non-finite loss), for the driver to report. A file and not
    a metric: in Ray Train 2.60 `Result.metrics` holds only the newest *checkpoint's* metrics, so a report
    without a checkpoint never reaches the driver. When the storage refuses even this small file (read-only,
    full: the very reason for some stops), the reason goes to the Ray cluster's key-value store, which the
    driver reads as well."""
    fs, root = _run_fs(cfg)
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{STOP_FILE}") as f:
            f.write(json.dumps({"stopped": reason}).encode())
    except OSError:
        kv = _ray_kv()
        if kv is None:
            raise
        kv._internal_kv_put(_stop_key(cfg), reason.encode(), overwrite=True)


def _ray_kv():
    """Ray's internal key-value store (in the GCS) when this process is connected to Ray, else None."""
    try:
        from ray.experimental import internal_kv
    except ImportError:
        return None
    return internal_kv if internal_kv._internal_kv_initialized() else None


def _stop_key(cfg) -> bytes:
    return f"raychat/stopped/{cfg.storage_path}/{cfg.run_name}".encode()


def read_stop(cfg, remove: bool = False) -> str | None:
    """The reason recorded by `write_stop`, or None; `remove` deletes it (a rerun continues the run)."""
    import pyarrow.fs as pafs

    fs, root = _run_fs(cfg)
    path = f"{root}/{STOP_FILE}"
    reason = None
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        with fs.open_input_stream(path) as f:
            reason = json.loads(f.read().decode())["stopped"]
        if remove:
            fs.delete_file(path)
    if (kv := _ray_kv()) is not None and (stored := kv._internal_kv_get(_stop_key(cfg))) is not None:
        reason = reason or stored.decode()
        if remove:
            kv._internal_kv_del(_stop_key(cfg))
    return reason


def new_checkpoint_dir() -> str:
    return tempfile.mkdtemp(prefix="raychat-ckpt-")
