"""Local paths and s3://, gs:// URIs behind one set of helpers.

A run's storage, its data and its tokenizer may each be a local directory or a bucket. Everything that must
tell the two apart asks `is_remote`; everything that reads or writes goes through pyarrow.fs (`filesystem`),
which serves both. Nothing here imports Ray at module level: the loop without Ray uses it too.

Buckets are configured as the cloud SDKs configure them, through the environment of every process that
touches them (the driver, and Ray's workers, which inherit it or get it from the job's runtime_env):
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an instance role), AWS_DEFAULT_REGION, and
AWS_ENDPOINT_URL for an S3-compatible store that is not AWS (pyarrow reads all of them); for gs://,
GOOGLE_APPLICATION_CREDENTIALS or the node's service account (docs/CLUSTER.md, "Storage: buckets, credentials,
one driver per run").
"""
import contextlib
import errno
import os
import shutil
import sys
import time


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


def check_access(path: str, flag: str) -> None:
    """For an s3:// or gs:// `path` (the value of `flag`): raise ValueError naming the URI and the fix when its
    bucket does not exist, the credentials are refused or the endpoint cannot be reached. Reads only (one
    bucket lookup, one listing), so a dry run may call it; a local path is not checked."""
    if not is_remote(path):
        return
    import pyarrow.fs as pafs

    try:
        fs, root = filesystem(path)
        bucket = root.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ValueError(f"{flag} {path}: {_bucket_missing(path, bucket)}")
        fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise ValueError(f"{flag} {path}: {explain(e, path)}") from None


def explain(e: BaseException, path: str) -> str:
    """An error of pyarrow's S3 or GCS client as a sentence saying what to fix (the AWS SDK's error codes,
    Google's status names). Never includes a credential: only the names of the variables that hold them."""
    text = _one_line(e)
    scheme = path.split("://", 1)[0]
    bucket = path.split("://", 1)[-1].split("/", 1)[0]
    if any(code in text for code in ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket '")):
        return _bucket_missing(path, bucket)
    if any(code in text for code in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED",
                                     "InvalidAccessKeyId", "AccessDenied", "EXPIRED_TOKEN", "PERMISSION_DENIED",
                                     "UNAUTHENTICATED", "Forbidden")):
        fix = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, AWS_SESSION_TOKEN, the instance "
               "role) and that they may list, read and write this bucket" if scheme == "s3" else
               "check GOOGLE_APPLICATION_CREDENTIALS (or the node's service account) and its roles on this bucket")
        return f"the storage refused the credentials ({text}): {fix}"
    if any(code in text for code in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Could not resolve",
                                     "UNAVAILABLE", "Connection refused")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if scheme == "s3" \
            else None
        where = f"the endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else "the storage endpoint"
        return f"{where} cannot be reached ({text}): check the endpoint and the network, or that the server runs"
    return text


def _bucket_missing(path: str, bucket: str) -> str:
    scheme = path.split("://", 1)[0]
    make = f"aws s3 mb s3://{bucket}" if scheme == "s3" else f"gcloud storage buckets create gs://{bucket}"
    return f"the bucket {bucket} does not exist (or these credentials cannot see it): create it (`{make}`) or fix the URI"


# Storage errors a restart would meet again: the run stops rather than retry into them.
LASTING_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# The errno of a StorageError raised when every try failed: the storage did not take the files in time.
UNREACHABLE = errno.EIO


class StorageError(RuntimeError):
    """A checkpoint could not be persisted: for a lasting reason (LASTING_ERRNOS: full, read-only, too big),
    or the storage kept failing through every retry (errno UNREACHABLE)."""

    def __init__(self, msg: str, errno_: int):
        super().__init__(msg)
        self.errno = errno_


def retry_policy() -> tuple[int, float]:
    """(tries, first wait in seconds) for writes to storage: RAYCHAT_STORAGE_TRIES (default 5) and
    RAYCHAT_STORAGE_RETRY_S (default 2; the wait doubles: 2, 4, 8, 16 s, so ~30 s of waiting besides the
    tries themselves: a failing S3 request takes ~6 s of the SDK's own retries)."""
    return max(1, int(os.environ.get("RAYCHAT_STORAGE_TRIES", 5))), float(os.environ.get("RAYCHAT_STORAGE_RETRY_S", 2))


def with_retries(work, what: str, log=None):
    """`work()`, tried again with doubling waits (retry_policy) while it raises a passing OSError. A lasting one
    (LASTING_ERRNOS) raises StorageError at once; the last failed try raises StorageError(UNREACHABLE) naming
    `what`, the tries and the last error."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    tries, wait = retry_policy()
    start = time.monotonic()
    for n in range(1, tries + 1):
        try:
            return work()
        except OSError as e:
            if e.errno in LASTING_ERRNOS:
                raise StorageError(f"{what}: {os.strerror(e.errno)}", e.errno) from e
            if n == tries:
                raise StorageError(f"{what}: the storage failed {tries} time(s) over "
                                   f"{time.monotonic() - start:.0f} s ({_one_line(e)})", UNREACHABLE) from e
            log(f"WARNING: writing {what} failed (try {n} of {tries}: {_one_line(e)}); retrying in {wait:g} s")
            time.sleep(wait)
            wait *= 2


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def free_bytes(path: str) -> int | None:
    """Free space under a local storage path (its nearest existing parent), None for s3:// and gs://."""
    if is_remote(path):
        return None
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def copy_to_storage(local_dir: str, fs, dest: str, log=None) -> None:
    """Copy a local checkpoint directory's files into `dest` on `fs` (local, s3, gs); the local copy is deleted
    either way. Files already in `dest` from other ranks stay; a rewrite of the same step replaces this rank's
    files. The done files (done_rank*.json) go last, so storage never holds a done file before the files it
    vouches for. A passing failure (a dropped connection, a store that is down for a while) is retried
    (`with_retries`); a lasting one, or one that outlasts the retries, raises StorageError."""
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    names = sorted(os.listdir(local_dir), key=lambda n: (n.startswith("done_rank"), n))

    def copy():
        fs.create_dir(dest, recursive=True)
        for name in names:
            pafs.copy_files(os.path.join(local_dir, name), f"{dest.rstrip('/')}/{name}", source_filesystem=local,
                            destination_filesystem=fs)

    scheme = {"s3": "s3://", "gcs": "gs://"}.get(fs.type_name, "")
    try:
        with_retries(copy, scheme + dest, log)
    finally:
        # Failed or not, the local copy is done with: a stop or a restart resumes from storage, never from it.
        shutil.rmtree(local_dir, ignore_errors=True)


def delete_quietly(fs, path: str) -> None:
    """Delete a directory on `fs` if it is there."""
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass
