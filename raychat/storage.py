"""Local paths and s3://, gs:// URIs behind one set of helpers.

A run's storage, its data and its tokenizer may each be a local directory or a bucket. Everything that must
tell the two apart asks `is_remote`; everything that reads or writes goes through pyarrow.fs (`filesystem`),
which serves both. Nothing here imports Ray at module level: the loop without Ray uses it too.
"""
import contextlib
import errno
import os
import shutil


def is_remote(path: str) -> bool:
    """A URI (s3://, gs://, file://, ...) rather than a local path."""
    return "://" in path


def absolute(path: str | None) -> str | None:
    """A local path made absolute (Ray workers chdir into their run directory); URIs and None unchanged."""
    if path is None or is_remote(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if is_remote(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def materialise(path: str):
    """A context manager giving a local directory with the contents of `path`: a local directory itself, a
    bucket's (a checkpoint directory) downloaded into a temporary one, deleted on exit."""
    if not is_remote(path):
        return contextlib.nullcontext(path)
    import ray.train

    return ray.train.Checkpoint(path).as_directory()


def copy_into(local_dir: str, dest: str) -> None:
    """Copy the files of a local directory into `dest` (local or a URI), replacing files of the same name."""
    import pyarrow.fs as pafs

    fs, root = filesystem(dest)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(local_dir, root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def copy_file_to(local_file: str, dest: str) -> None:
    """Copy one local file to the file path `dest` (local or a URI), creating its directory."""
    import pyarrow.fs as pafs

    fs, path = filesystem(dest)
    if parent := path.rpartition("/")[0]:
        fs.create_dir(parent, recursive=True)
    pafs.copy_files(local_file, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


# Storage errors a restart would meet again: the run stops rather than retry into them.
LASTING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class StorageError(RuntimeError):
    """A checkpoint could not be persisted for a lasting reason (LASTING_ERRNOS): full, read-only, too big."""

    def __init__(self, msg: str, errno_: int):
        super().__init__(msg)
        self.errno = errno_


def free_bytes(path: str) -> int | None:
    """Free space under a local storage path (its nearest existing parent), None for s3:// and gs://."""
    if is_remote(path):
        return None
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def copy_to_storage(local_dir: str, fs, dest: str) -> None:
    """Copy a local checkpoint directory's files into `dest` on `fs` (local, s3, gs); the local copy is deleted
    either way. Files already in `dest` from other ranks stay; a rewrite of the same step replaces this rank's
    files. A lasting failure (LASTING_ERRNOS) raises StorageError."""
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


def delete_quietly(fs, path: str) -> None:
    """Delete a directory on `fs` if it is there."""
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass
