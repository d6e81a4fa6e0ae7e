"""A run's directory, `{storage_path}/{run_name}/` (local, s3:// or gs://), and what is in it: its
checkpoints (`step_XXXXXX/`), the choice of the one a run resumes or a command reads, and `stopped.json`.

Training resumes through `resume_checkpoint`; eval and export read a checkpoint through `find_checkpoint`.
Both skip incomplete or corrupt checkpoints (checkpoint.check_complete) with a warning naming the problem.
Ray Train keeps a list of the reported checkpoints there too; `repair_ray_snapshot` keeps it in step with the
step directories that exist. The driver's lease is raychat.lease.
"""
import contextlib
import json
import os
import sys
from typing import NamedTuple

from raychat import checkpoint as ckpt_files
from raychat import storage


def run_dir(cfg) -> str:
    return storage.join(cfg.storage_path, cfg.run_name)


def find_run(storage_path: str, run_name: str) -> str:
    """The directory of run `run_name`; a missing one raises naming the runs that are there (a run written
    under another --base-dir, such as the quickstart's, is the usual cause)."""
    path = storage.join(storage_path, run_name)
    if storage.is_remote(storage_path) or os.path.isdir(path):
        return path
    runs = sorted(d for d in os.listdir(storage_path) if os.path.isdir(os.path.join(storage_path, d))) \
        if os.path.isdir(storage_path) else []
    found = f"the runs there: {', '.join(runs)}" if runs else "it holds no runs"
    raise FileNotFoundError(f"no run named {run_name} under {storage_path} ({found}); pass the --base-dir or "
                            "--storage-path the run was trained with (the quickstart's is "
                            "~/.cache/raychat/quickstart, and it prints the eval command for its run)")


def list_run_steps(path: str) -> list[tuple[int, str]]:
    """(step, path) of every step_XXXXXX directory of a run directory, local or remote, oldest first."""
    import pyarrow.fs as pafs

    if not storage.is_remote(path):
        return ckpt_files.list_step_dirs(path)
    fs, root = storage.filesystem(path)
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        m = ckpt_files.STEP_DIR.match(os.path.basename(info.path))
        if m and info.type == pafs.FileType.Directory:
            found.append((int(m.group(1)), storage.join(path, os.path.basename(info.path))))
    return sorted(found)


@contextlib.contextmanager
def first_complete(candidates, log):
    """Yield the local directory of the first complete checkpoint among `candidates` (newest first), or None;
    each incomplete one is skipped with a warning."""
    for path in candidates:
        with storage.materialise(path) as d:
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
    with the same --run-name). The driver's preflight (no fit yet) and every worker choose through this one
    function.
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
        with storage.materialise(path) as d:
            return ckpt_files.read_meta(d).get("fit_id")
    except (OSError, ValueError):
        return None


class FoundCheckpoint(NamedTuple):
    step: int
    path: str  # in the run directory (a URI for a remote run)
    local_dir: str  # the same files on this machine: `path` itself, or a download of it


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr)


@contextlib.contextmanager
def find_checkpoint(run_dir: str, step: int | None = None, log=_warn):
    """The checkpoint eval and export read: the newest complete one of the run, or step `step`.

    Yields a FoundCheckpoint. A damaged `step` raises rather than fall back to an older one in its place;
    without `step` each damaged checkpoint is skipped with a warning through `log`."""
    steps = [(s, p) for s, p in list_run_steps(run_dir) if step in (None, s)]
    for s, path in reversed(steps):
        with storage.materialise(path) as d:
            problem = ckpt_files.check_complete(d)
            if problem is None:
                yield FoundCheckpoint(s, path, d)
                return
            if step is not None:
                raise ValueError(f"--step {step}: checkpoint {path} cannot be used: {problem}; pick another step")
            log(f"WARNING: skipping incomplete checkpoint {path}: {problem}")
    raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' at step {step}'} in "
                            f"{run_dir}; list the run with `ls {run_dir}`")


# ----------------------------------------------------------------------------------------------------
# Ray Train's own record of the run's checkpoints

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def repair_ray_snapshot(cfg, log=print) -> None:
    """Ray Train 2.60 records every reported checkpoint in `{run_dir}/checkpoint_manager_snapshot.json` and, at
    the next fit() on the run, refuses to start when one of them no longer exists (CheckpointManagerInitialization-
    Error: "...a checkpoint that does not exist anymore ... a corrupted run directory"): a step directory the
    user deleted stops the run for good. raychat chooses the checkpoint it resumes itself (resume_checkpoint);
    Ray's list only drives --keep-checkpoints. So before fit() the entries whose directories are gone are
    dropped from it, and a snapshot Ray could not load (unreadable, or written by another Ray version) is
    removed, with a message: --keep-checkpoints then no longer deletes the checkpoints it listed."""
    import ray

    fs, root = storage.filesystem(run_dir(cfg))
    path = f"{root}/{RAY_SNAPSHOT}"
    try:
        with fs.open_input_stream(path) as f:
            snap = json.loads(f.read().decode())
        results = snap["checkpoint_results"]
        problem = None if snap.get("ray_version") == ray.__version__ else f"written by Ray {snap.get('ray_version')}"
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError) as e:
        problem = f"unreadable ({e})"
    if problem is not None:
        fs.delete_file(path)
        log(f"Removed Ray Train's checkpoint list {storage.join(run_dir(cfg), RAY_SNAPSHOT)}: {problem}; "
            "--keep-checkpoints will not delete the checkpoints written before this run")
        return
    existing = {os.path.basename(p) for _, p in list_run_steps(run_dir(cfg))}
    gone = [r["checkpoint_dir_name"] for r in results if r["checkpoint_dir_name"] not in existing]
    if not gone:
        return
    kept = [(r, i) for r, i in zip(results, snap["checkpoint_report_indices"]) if r["checkpoint_dir_name"] in existing]
    snap["checkpoint_results"] = [r for r, _ in kept]
    snap["checkpoint_report_indices"] = [i for _, i in kept]
    latest = snap.get("latest_checkpoint_result")
    if latest is not None and latest["checkpoint_dir_name"] not in existing:
        snap["latest_checkpoint_result"] = max(kept, key=lambda ri: ri[1])[0] if kept else None
    pending = [(r, v) for r, v in zip(snap["pending_training_results"], snap["pending_validation_specs"])
               if r["checkpoint_dir_name"] in existing]
    snap["pending_training_results"] = [r for r, _ in pending]
    snap["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        snap[key] = [name for name in snap.get(key, []) if name in existing]
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(snap).encode())
    log(f"Run {cfg.run_name}: checkpoint(s) {', '.join(gone)} no longer exist; dropped from Ray Train's checkpoint "
        "list so that the run starts")


def prune_unreported(cfg, log=print) -> None:
    """--keep-checkpoints is Ray Train's (CheckpointConfig.num_to_keep), which deletes only the checkpoints it
    was told of. A checkpoint persisted by every rank but not yet reported when a worker died is resumed by the
    restart (resume_checkpoint takes it) yet never reported, so Ray never deletes it. After fit(), each step
    directory older than the oldest one Ray keeps and not on its list goes the same way."""
    if cfg.keep_checkpoints is None:
        return
    fs, root = storage.filesystem(run_dir(cfg))
    try:
        with fs.open_input_stream(f"{root}/{RAY_SNAPSHOT}") as f:
            listed = {r["checkpoint_dir_name"] for r in json.loads(f.read().decode())["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return
    steps = list_run_steps(run_dir(cfg))
    kept = [s for s, p in steps if os.path.basename(p) in listed]
    if len(kept) < cfg.keep_checkpoints:
        return
    for step, path in steps:
        if step < min(kept) and os.path.basename(path) not in listed:
            storage.delete_quietly(*storage.filesystem(path))
            log(f"Deleted {path}: older than the {len(kept)} checkpoint(s) kept (--keep-checkpoints), and never "
                "reported to Ray Train (a worker died first)")


# ----------------------------------------------------------------------------------------------------
# Why a run stopped early, for its driver

STOP_FILE = "stopped.json"


def write_stop(cfg, reason: str) -> None:
    """Rank 0 records why training stopped early (a non-finite loss), for the driver to report. A file and not
    a metric: in Ray Train 2.60 `Result.metrics` holds only the newest *checkpoint's* metrics, so a report
    without a checkpoint never reaches the driver. When the storage refuses even this small file (read-only,
    full: the very reason for some stops), the reason goes to the Ray cluster's key-value store, which the
    driver reads as well."""
    fs, root = storage.filesystem(run_dir(cfg))
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(f"{root}/{STOP_FILE}") as f:
            f.write(json.dumps({"stopped": reason}).encode())
    except OSError as e:
        kv = _ray_kv()
        if kv is None:  # no Ray: the caller has the reason in the loop's summary
            _warn(f"WARNING: the stop record could not be written to {run_dir(cfg)}: {storage.explain(e, run_dir(cfg))}")
            return
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

    fs, root = storage.filesystem(run_dir(cfg))
    path = f"{root}/{STOP_FILE}"
    reason = None
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            with fs.open_input_stream(path) as f:
                reason = json.loads(f.read().decode())["stopped"]
            if remove:
                fs.delete_file(path)
    except OSError:
        pass  # the storage is unreachable (often the very reason for the stop): the key-value store has it
    if (kv := _ray_kv()) is not None and (stored := kv._internal_kv_get(_stop_key(cfg))) is not None:
        reason = reason or stored.decode()
        if remove:
            kv._internal_kv_del(_stop_key(cfg))
    return reason
