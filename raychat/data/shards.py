"""Pretraining shards (docs/REFERENCE.md §8): where they live, which are train and val, download and prepare.

A shard is a parquet file with one string column `text`, one document per row, in row groups of (by
default) 1024 documents: the format of the reference's FineWeb-Edu repackaging, which `prepare` also writes
for local text. A data directory may be a local path, a mounted shared filesystem, `file://`, `s3://` or
`gs://`: every read goes through `pyarrow.fs` (`raychat.storage.filesystem`).

Sources. `download` fetches one of two repackagings, each into its own directory: FineWeb-Edu (1823
shards, `<base>/base_data`, what the seed recipe trains on) or ClimbMix (6543 shards,
`<base>/base_data_climbmix`, the 2026-07 recipe's data and the same folder nanochat 92d63d4 reads). In
both the last shard is the validation shard, and `download -n N` fetches train shards 0..N-1 plus it.

Split rule (changes the reference's rule on purpose). The reference takes the file that sorts last
*locally* as val, so after `-n 8` val is shard_00007 and after `-n 370` it is shard_00369: the train/val
membership depends on how much was downloaded. Here

- val is `val.parquet` if the directory has one (what `prepare` writes), else the highest-numbered
  `shard_NNNNN.parquet`, which must be a source's last shard (shard_01822 for FineWeb-Edu, shard_06542 for
  ClimbMix): `download` always fetches it, as nanochat 92d63d4 pins its val shard;
- train is every other `.parquet` file, sorted by name (`.tmp` partials never count).

So val bpb is measured on the same documents however many shards a machine holds.
"""
import json
import os
import re
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raychat import storage
from raychat.common import get_base_dir


@dataclass(frozen=True)
class Source:
    """A dataset `download` can fetch: shards shard_00000 .. shard_{num_shards-1}, the last one held out."""
    name: str
    base_url: str  # with {i:05d} where the shard index goes
    num_shards: int
    subdir: str  # its default directory under <base>

    @property
    def val_index(self) -> int:
        return self.num_shards - 1


_HF = "https://huggingface.co/datasets/karpathy"
SOURCES = {s.name: s for s in (
    Source("fineweb-edu", f"{_HF}/fineweb-edu-100b-shuffle/resolve/main/shard_{{i:05d}}.parquet", 1823, "base_data"),
    Source("climbmix", f"{_HF}/climbmix-400b-shuffle/resolve/main/shard_{{i:05d}}.parquet", 6543,
           "base_data_climbmix"),
)}
DEFAULT_SOURCE = "fineweb-edu"  # the seed recipe's data
VAL_FILE = "val.parquet"
CHUNK_BYTES = 1024 * 1024
TEXT_COLUMN = "text"


class ShardError(ValueError):
    """A shard file or a data directory that cannot be used; the message names the file and the fix."""


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"source={name!r}: choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


_SHARD_NAME = re.compile(r"shard_(\d{5})\.parquet")


def default_data_dir(base_dir: str | None = None, create: bool = True, source: str = DEFAULT_SOURCE) -> str:
    """`<base>/base_data` (FineWeb-Edu) or `<base>/base_data_climbmix`, the reference's layouts;
    `create=False` (a dry run) makes no directory."""
    base = get_base_dir(base_dir, create=create)
    return storage.join(base, get_source(source).subdir)


# ---- storage ------------------------------------------------------------------------------------------

def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def list_parquet(data_dir: str) -> list[str]:
    """Every `*.parquet` file directly in `data_dir`, sorted by name, as paths/URIs in `data_dir`'s form."""
    fs, root = storage.filesystem(data_dir)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        # A source's default directory (the one a recipe reads by default) gets that source's download command.
        source = next((s.name for s in SOURCES.values() if s.subdir == _basename(data_dir)), DEFAULT_SOURCE)
        option = "" if source == DEFAULT_SOURCE else f" --source {source}"
        raise FileNotFoundError(f"data directory {data_dir} does not exist: download shards with "
                                f"`python -m raychat.data download -n 8{option}` or make some with "
                                f"`python -m raychat.data prepare --from PATH --out {data_dir}`")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"data directory {data_dir} is a file; pass the folder that holds the shards")
    names = sorted(_basename(f.path) for f in fs.get_file_info(pafs.FileSelector(root, recursive=False))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    return [storage.join(data_dir, name) for name in names]


def split_shards(data_dir: str) -> tuple[list[str], str]:
    """(train_files, val_file) of `data_dir` by the rule in the module docstring."""
    files = list_parquet(data_dir)
    by_name = {_basename(f): f for f in files}
    # Only the highest number tells a source's val shard from a train shard: a ClimbMix download of 1823+
    # train shards holds shard_01822 too, and if its val shard failed, 01822 must not pass for val.
    indices = sorted(int(m.group(1)) for n in by_name if (m := _SHARD_NAME.fullmatch(n)))
    pinned = shard_name(indices[-1]) if indices and indices[-1] in {s.val_index for s in SOURCES.values()} else None
    val = by_name.get(VAL_FILE) or by_name.get(pinned)
    if val is None:
        last = " or ".join(f"{shard_name(s.val_index)} ({s.name})" for s in SOURCES.values())
        highest = f", the highest-numbered being {shard_name(indices[-1])}" if indices else ""
        raise ShardError(f"{data_dir} has no validation shard: it needs {VAL_FILE} (written by `python -m "
                         f"raychat.data prepare`) or, as its highest-numbered shard, {last}, which every "
                         f"`python -m raychat.data download -n N` fetches; it holds {len(files)} .parquet "
                         f"files{highest}")
    train = [f for f in files if f != val]
    if not train:
        raise ShardError(f"{data_dir} has a validation shard but no training shard: download some with "
                         f"`python -m raychat.data download -n 8` or prepare local text with "
                         f"`python -m raychat.data prepare --from PATH --out {data_dir}`")
    return train, val


@contextmanager
def open_shard(path: str) -> Iterator[pq.ParquetFile]:
    """The shard at `path` (local or URI) as a ParquetFile, open for the `with` block.

    Open once and read many row groups: each open reads the footer again. A file that is not parquet
    raises ShardError naming it; a missing one, FileNotFoundError.
    """
    fs, inner = storage.filesystem(path)
    with fs.open_input_file(inner) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise ShardError(f"{path} is not a readable parquet file (corrupt or truncated?): "
                             f"{str(e).rstrip('.')}. Delete it and download or prepare it again") from e
        yield pf


def validate_shard(path: str) -> int:
    """Check that `path` is a readable parquet file with a string column `text`; return its row count."""
    try:
        with open_shard(path) as pf:
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
    except FileNotFoundError as e:
        raise ShardError(f"shard {path} does not exist") from e
    if TEXT_COLUMN not in schema.names:
        raise ShardError(f"{path} has no `{TEXT_COLUMN}` column (columns: {schema.names}); a shard holds one "
                         f"document per row in a string column named `{TEXT_COLUMN}`")
    kind = schema.field(TEXT_COLUMN).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ShardError(f"{path}: column `{TEXT_COLUMN}` has type {kind}, expected string (one document per row)")
    return num_rows


def num_row_groups(path: str) -> int:
    with open_shard(path) as pf:
        return pf.num_row_groups


def row_group_texts(pf: pq.ParquetFile, row_group: int) -> list[str]:
    """The `text` values of row group `row_group` of an open shard, in order."""
    if not 0 <= row_group < pf.num_row_groups:
        raise IndexError(f"the shard has {pf.num_row_groups} row groups, asked for row group {row_group}")
    return pf.read_row_group(row_group, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).to_pylist()


def read_row_group_texts(path: str, row_group: int) -> list[str]:
    """The `text` values of one row group of the shard at `path`, in order."""
    with open_shard(path) as pf:
        try:
            return row_group_texts(pf, row_group)
        except IndexError as e:
            raise IndexError(f"{path}: {e}") from None


def iter_texts(files: list[str]) -> Iterator[str]:
    """Every document of `files`, file by file, row group by row group (the reference's
    `parquets_iter_batched(split)` flattened; tok_train uses it)."""
    for path in files:
        with open_shard(path) as pf:
            for rg in range(pf.num_row_groups):
                yield from row_group_texts(pf, rg)


# ---- download -----------------------------------------------------------------------------------------

@dataclass
class DownloadSummary:
    requested: list[int]
    fetched: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # already present
    failed: dict[int, str] = field(default_factory=dict)  # index -> reason

    @property
    def ok(self) -> int:
        return len(self.fetched) + len(self.skipped)


class _NotFound(Exception):
    """HTTP 404: retrying cannot help."""


def download_indices(num_shards: int, source: str = DEFAULT_SOURCE) -> list[int]:
    """Train shards 0 .. num_shards-1 plus the source's val shard (its last: 1822 for FineWeb-Edu, 6542 for
    ClimbMix); num_shards = -1 (or more than exist) means every shard."""
    src = get_source(source)
    if num_shards < 1 and num_shards != -1:
        raise ValueError(f"num_shards={num_shards}: ask for at least 1 shard (or -1 for all {src.num_shards})")
    train = src.val_index if num_shards == -1 else min(num_shards, src.val_index)
    return list(range(train)) + [src.val_index]


def _fetch_one(index: int, data_dir: str, base_url: str, max_attempts: int, base_delay: float,
               timeout: float, source: Source) -> str:
    """Download one shard to `<name>.tmp`, validate, rename; 'fetched' or 'skipped', else raise."""
    import requests

    name = shard_name(index)
    fs, root = storage.filesystem(data_dir)
    final, tmp = f"{root}/{name}", f"{root}/{name}.tmp"
    if fs.get_file_info(final).type == pafs.FileType.File:
        return "skipped"
    url = base_url.format(i=index)
    last_error = ""
    for attempt in range(1, max_attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=timeout) as r:
                if r.status_code == 404:
                    raise _NotFound(f"{name}: HTTP 404 at {url}; {source.name} has shards "
                                    f"0..{source.val_index}, check -n, --source and --base-url")
                r.raise_for_status()
                with fs.open_output_stream(tmp) as out:
                    for chunk in r.iter_content(chunk_size=CHUNK_BYTES):
                        out.write(chunk)
            validate_shard(storage.join(data_dir, f"{name}.tmp"))
            fs.move(tmp, final)
            return "fetched"
        except _NotFound:
            _remove(fs, tmp)
            raise
        except Exception as e:  # network errors, truncated bodies, files that fail validation
            last_error = f"{type(e).__name__}: {e}"
            _remove(fs, tmp)
            _remove(fs, final)
            if attempt < max_attempts:
                time.sleep(base_delay * 2 ** (attempt - 1))  # 2, 4, 8, 16 s by default, as the reference
    raise RuntimeError(f"{name}: {max_attempts} attempts failed, last: {last_error}")


def _remove(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def download(num_shards: int, workers: int = 4, data_dir: str | None = None, base_url: str | None = None,
             max_attempts: int = 5, base_delay: float = 2.0, timeout: float = 30.0,
             progress: bool = True, source: str = DEFAULT_SOURCE) -> DownloadSummary:
    """Fetch train shards 0..num_shards-1 plus the val shard of `source` ("fineweb-edu" or "climbmix") into
    `data_dir` (default: the source's directory under `<base>`), from `base_url` (default: the source's).

    Threads (the work is network-bound); each file is streamed in 1 MB chunks to `<file>.tmp`, checked
    with `validate_shard`, then renamed, so a crash never leaves a partial `.parquet`. Up to `max_attempts`
    tries with exponential backoff `base_delay * 2^k`; a 404 fails at once. Present files are skipped.
    """
    from tqdm import tqdm

    src = get_source(source)
    base_url = base_url or src.base_url
    if workers < 1:
        raise ValueError(f"workers={workers}: use at least 1 download worker")
    if "{i" not in base_url:
        raise ValueError(f"base_url={base_url!r} must contain '{{i:05d}}' where the shard index goes")
    data_dir = data_dir or default_data_dir(source=source)
    fs, root = storage.filesystem(data_dir)
    fs.create_dir(root, recursive=True)
    indices = download_indices(num_shards, source)
    summary = DownloadSummary(requested=indices)
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            outcome = _fetch_one(i, data_dir, base_url, max_attempts, base_delay, timeout, src)
        except Exception as e:
            with lock:
                summary.failed[i] = str(e)
            print(f"failed: {e}", file=sys.stderr, flush=True)
        else:
            with lock:
                (summary.fetched if outcome == "fetched" else summary.skipped).append(i)
        bar.update(1)

    with tqdm(total=len(indices), desc="shards", unit="shard", disable=not progress) as bar:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, indices))
    summary.fetched.sort()
    summary.skipped.sort()
    print(f"Done! Downloaded: {summary.ok}/{len(indices)} shards to {data_dir}", flush=True)
    return summary


# ---- prepare ------------------------------------------------------------------------------------------

TXT_DOCS = ("paragraph", "file", "line")
_SOURCE_SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLANK = re.compile(rb"^[ \t\r\f\v]*\n?$")


@dataclass
class PrepareSummary:
    train_files: list[str]
    val_file: str
    train_docs: int
    val_docs: int
    train_chars: int
    val_chars: int
    dropped_empty: int
    replaced_chars: int
    source_files: int


def _decode(raw: bytes, counter: list[int]) -> str:
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text:  # count only replacements we made, not U+FFFD already in the source
        counter[0] += text.count("\ufffd") - raw.count("\ufffd".encode())
    return text


def _iter_txt(path: str, mode: str, counter: list[int]) -> Iterator[str]:
    # Lines are split on b"\n" before decoding: 0x0A never occurs inside a multi-byte UTF-8 character.
    with open(path, "rb") as f:
        if mode == "file":
            yield _decode(f.read(), counter)
        elif mode == "line":
            for raw in f:
                yield _decode(raw.rstrip(b"\r\n"), counter)
        else:  # paragraph: a run of one or more blank (whitespace-only) lines ends a document
            lines: list[bytes] = []
            for raw in f:
                if _BLANK.match(raw):
                    if lines:
                        yield _decode(b"".join(lines).rstrip(b"\r\n"), counter)
                        lines = []
                else:
                    lines.append(raw)
            if lines:
                yield _decode(b"".join(lines).rstrip(b"\r\n"), counter)


def _iter_jsonl(path: str, counter: list[int]) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, counter))
            except json.JSONDecodeError as e:
                raise ShardError(f"{path}:{lineno} is not valid JSON ({e}); a .jsonl source holds one JSON "
                                 f"object with a string `text` field per line") from e
            text = record.get(TEXT_COLUMN) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ShardError(f"{path}:{lineno} has no string `{TEXT_COLUMN}` field (got "
                                 f"{type(text).__name__}); each line needs {{\"text\": \"...\"}}")
            yield text


def _iter_parquet(path: str) -> Iterator[str]:
    validate_shard(path)
    for text in iter_texts([path]):
        if text is not None:
            yield text


def _stdlib_files() -> list[str]:
    """The running Python's standard library `.py` sources (never third-party site/dist-packages)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith(".py")]
    return files


def source_files(source: str) -> list[str]:
    """The files `prepare` reads for `source`: a file, a folder (recursive, sorted), or 'stdlib'."""
    if source == "stdlib":
        return _stdlib_files()
    if os.path.isfile(source):
        if not source.endswith(_SOURCE_SUFFIXES):
            raise ShardError(f"source {source} is not one of {_SOURCE_SUFFIXES}; convert it or pass a folder")
        return [source]
    if os.path.isdir(source):
        files, skipped = [], 0
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for n in sorted(filenames):
                if n.endswith(_SOURCE_SUFFIXES):
                    files.append(os.path.join(dirpath, n))
                else:
                    skipped += 1
        if skipped:
            warnings.warn(f"prepare: skipped {skipped} files in {source} that are not {_SOURCE_SUFFIXES}")
        if not files:
            raise ShardError(f"source folder {source} holds no {_SOURCE_SUFFIXES} files")
        return files
    raise FileNotFoundError(f"source {source} does not exist; pass a .txt/.jsonl/.parquet file, a folder of "
                            f"them, or 'stdlib' for the built-in offline corpus")


def iter_source_docs(files: list[str], txt_docs: str, counter: list[int]) -> Iterator[tuple[str, str]]:
    """(file, document) for every document of `files` in order; stdlib `.py` files are one doc each."""
    for path in files:
        if path.endswith(".txt"):
            docs = _iter_txt(path, txt_docs, counter)
        elif path.endswith(".jsonl"):
            docs = _iter_jsonl(path, counter)
        elif path.endswith(".parquet"):
            docs = _iter_parquet(path)
        else:  # .py from the stdlib corpus
            docs = _iter_txt(path, "file", counter)
        for doc in docs:
            yield path, doc


class _ShardWriter:
    """Writes row groups of exactly `rows_per_group` docs into `<name>.tmp`, renamed on close."""

    SCHEMA = pa.schema([(TEXT_COLUMN, pa.string())])

    def __init__(self, fs: pafs.FileSystem, root: str, name: str, rows_per_group: int):
        self.fs, self.final, self.tmp = fs, f"{root}/{name}", f"{root}/{name}.tmp"
        self.rows_per_group = rows_per_group
        # zstd level 3, no dictionary, no statistics: the settings of the reference's repackaged shards.
        self.writer = pq.ParquetWriter(self.tmp, self.SCHEMA, filesystem=fs, compression="zstd",
                                       compression_level=3, use_dictionary=False, write_statistics=False)
        self.pending: list[str] = []
        self.docs = self.chars = 0

    def add(self, doc: str) -> bool:
        """Buffer one doc; True when that completed a row group."""
        self.pending.append(doc)
        self.docs += 1
        self.chars += len(doc)
        if len(self.pending) == self.rows_per_group:
            self._flush()
            return True
        return False

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.table({TEXT_COLUMN: pa.array(self.pending, pa.string())}),
                                    row_group_size=self.rows_per_group)
            self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.fs.move(self.tmp, self.final)


def prepare(source: str, out_dir: str, rows_per_group: int = 1024, shard_chars: int = 250_000_000,
            val_fraction: float = 0.01, txt_docs: str = "paragraph", overwrite: bool = False,
            progress: bool = True) -> PrepareSummary:
    """Turn local text into shards of the FineWeb-Edu format: `shard_00000.parquet`, ... and `val.parquet`.

    - Sources: a `.txt` (documents per `txt_docs`: "paragraph" = split on runs of blank lines, "file" =
      the whole file, "line" = one per line), a `.jsonl` (the `text` field of each line), a `.parquet` (its
      `text` column), a folder of them (recursive, sorted by path, mixed types; other files are skipped with
      a warning), or "stdlib" (the running Python's standard-library `.py` files, one document each: a
      corpus every machine has offline).
    - Empty and whitespace-only documents are dropped. Non-UTF-8 bytes in .txt/.jsonl become U+FFFD and
      are counted in a warning.
    - Val (deterministic, representative of the whole source): with k = round(1 / val_fraction), kept
      documents 0, k, 2k, ... go to `val.parquet`, the rest to train shards in order.
    - A train shard is cut when it holds >= `shard_chars` characters and its doc count is a multiple of
      `rows_per_group` (the reference's repackaging rule); the last shard takes the remainder.
    """
    from tqdm import tqdm

    if rows_per_group < 1:
        raise ValueError(f"rows_per_group={rows_per_group}: a row group needs at least 1 document")
    if shard_chars < 1:
        raise ValueError(f"shard_chars={shard_chars}: must be >= 1")
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction}: must be in (0, 0.5]; the reference holds out ~0.05%")
    if txt_docs not in TXT_DOCS:
        raise ValueError(f"txt_docs={txt_docs!r}: choose one of {TXT_DOCS}")
    files = source_files(source)
    fs, root = storage.filesystem(out_dir)
    fs.create_dir(root, recursive=True)
    existing = list_parquet(out_dir)
    if existing:
        if not overwrite:
            raise ShardError(f"{out_dir} already holds {len(existing)} .parquet files; choose an empty --out or "
                             f"pass --overwrite to delete them first")
        for path in existing:
            fs.delete_file(storage.filesystem(path)[1])

    stride = max(1, round(1 / val_fraction))
    counter = [0]  # U+FFFD replacements made while decoding
    kept = dropped = 0
    train_files: list[str] = []
    train_docs = train_chars = 0
    val = _ShardWriter(fs, root, VAL_FILE, rows_per_group)
    shard: _ShardWriter | None = None
    total_bytes = sum(os.path.getsize(f) for f in files)
    last_file = None
    try:
        with tqdm(total=total_bytes, desc="prepare", unit="B", unit_scale=True, disable=not progress) as bar:
            for path, doc in iter_source_docs(files, txt_docs, counter):
                if path != last_file:
                    if last_file is not None:
                        bar.update(os.path.getsize(last_file))
                    last_file = path
                if not doc.strip():
                    dropped += 1
                    continue
                if kept % stride == 0:
                    val.add(doc)
                else:
                    if shard is None:
                        shard = _ShardWriter(fs, root, shard_name(len(train_files)), rows_per_group)
                        train_files.append(storage.join(out_dir, shard_name(len(train_files))))
                    if shard.add(doc) and shard.chars >= shard_chars:
                        train_docs, train_chars = train_docs + shard.docs, train_chars + shard.chars
                        shard.close()
                        shard = None
                kept += 1
            if last_file is not None:
                bar.update(os.path.getsize(last_file))
        if shard is not None:
            train_docs, train_chars = train_docs + shard.docs, train_chars + shard.chars
            shard.close()
            shard = None
        if kept == 0:
            raise ShardError(f"source {source} holds no non-empty documents ({dropped} empty ones dropped)")
        if not train_files:
            raise ShardError(f"source {source} holds only {kept} document(s), all held out for val; add text "
                             f"or raise the doc count (val takes every {stride}th document)")
        val.close()
    except BaseException:
        # A failed prepare leaves nothing behind: no .tmp, and no shards that a rerun would refuse to overwrite.
        for w in (shard, val):
            if w is not None:
                w.writer.close()
        _cleanup_tmp(fs, root)
        for path in train_files + [storage.join(out_dir, VAL_FILE)]:
            _remove(fs, storage.filesystem(path)[1])
        raise
    if counter[0]:
        warnings.warn(f"prepare: {counter[0]} invalid UTF-8 byte sequences in {source} were replaced by U+FFFD")
    return PrepareSummary(train_files=train_files, val_file=storage.join(out_dir, VAL_FILE), train_docs=train_docs,
                          val_docs=val.docs, train_chars=train_chars, val_chars=val.chars, dropped_empty=dropped,
                          replaced_chars=counter[0], source_files=len(files))


def _cleanup_tmp(fs: pafs.FileSystem, root: str) -> None:
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if info.path.endswith(".tmp"):
            fs.delete_file(info.path)
