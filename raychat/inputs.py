"""What a run reads besides its checkpoints (the shards and the tokenizer), and their fingerprint.

A checkpoint's data positions (each slot's shard, row group and document) point into the shards the run read,
and its model into the tokenizer's vocabulary: resumed on other shards or another tokenizer, a run goes on
without any error, on other documents or other tokens. So every checkpoint's meta.json records the inputs'
fingerprint (`fingerprint`), and a resume refuses a changed one, naming what changed, unless --allow-changed
names it (`check_unchanged`: `data`, `tokenizer`, config.INPUT_NAMES).

The fingerprint is cheap (no data page is read): per shard its name, size, rows, row groups and a digest of
its parquet footer's row groups (rows, sizes, the `text` column's compressed size and statistics); for the
tokenizer, the sha256 of its two small files. Paths are not part of it: a workspace moved or copied (another
mount, an s3:// mirror) with the same files resumes. A shard rewritten with the same sizes and statistics
in every row group escapes it; a full content hash would read every shard at every start.
"""
import hashlib
from concurrent.futures import ThreadPoolExecutor

from raychat import storage

def read_tokenizer_files(tokenizer_dir: str) -> dict:
    """The tokenizer's two small files as bytes (local path or s3://, gs://): workers and data actors on any
    node get the tokenizer with their config, so no node needs the directory."""
    from raychat.tokenizer import TOKEN_BYTES_FILE, TOKENIZER_FILE

    fs, root = storage.filesystem(tokenizer_dir)
    files = {}
    for name in (TOKENIZER_FILE, TOKEN_BYTES_FILE):
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                files[name] = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{tokenizer_dir}/{name} is missing: train a tokenizer with "
                                    "`python -m scripts.tok_train` or pass --tokenizer-dir") from None
    return files


def _shard(path: str) -> dict:
    import pyarrow.parquet as pq

    fs, inner = storage.filesystem(path)
    with fs.open_input_file(inner) as f:
        size = f.size()
        md = pq.ParquetFile(f).metadata
    digest = hashlib.sha256()
    for r in range(md.num_row_groups):
        rg = md.row_group(r)
        parts = [rg.num_rows, rg.total_byte_size]
        for c in range(rg.num_columns):
            col = rg.column(c)
            stats = col.statistics
            parts += [col.path_in_schema, col.total_compressed_size,
                      repr((stats.min, stats.max)) if stats is not None and stats.has_min_max else None]
        digest.update(repr(parts).encode())
    return {"name": path.rstrip("/").rsplit("/", 1)[-1], "bytes": size, "rows": md.num_rows,
            "row_groups": md.num_row_groups, "footer": digest.hexdigest()[:16]}


def fingerprint(data_dir: str, tokenizer_files: dict) -> dict:
    """The fingerprint of a run's inputs: {"data": {"train": [shard, ...], "val": shard}, "tokenizer":
    {file name: sha256}}. The footers are read on a few threads (one request or two each on a bucket)."""
    from raychat.data.shards import split_shards

    train, val = split_shards(data_dir)
    with ThreadPoolExecutor(max_workers=8) as pool:
        shards = list(pool.map(_shard, train + [val]))
    return {"data": {"train": shards[:-1], "val": shards[-1]},
            "tokenizer": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(tokenizer_files.items())}}


def _describe_shards(saved: list, now: list) -> list[str]:
    old, new = {s["name"]: s for s in saved}, {s["name"]: s for s in now}
    said = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None:
            said.append(f"{name} added")
        elif b is None:
            said.append(f"{name} removed")
        elif a != b:
            diffs = [f"{k} {a[k]} -> {b[k]}" for k in ("bytes", "rows", "row_groups") if a[k] != b[k]]
            said.append(f"{name} rewritten ({', '.join(diffs) or 'same sizes, other row groups'})")
    return said


def changes(saved: dict, now: dict) -> dict:
    """{"data": sentence, "tokenizer": sentence} for each input that differs between two fingerprints."""
    found = {}
    shards = _describe_shards(saved["data"]["train"], now["data"]["train"])
    shards += [f"validation {s}" for s in _describe_shards([saved["data"]["val"]], [now["data"]["val"]])]
    if shards:
        shown = shards[:4] + ([f"{len(shards) - 4} more"] if len(shards) > 4 else [])
        found["data"] = "the shards changed: " + "; ".join(shown)
    if saved["tokenizer"] != now["tokenizer"]:
        names = [n for n in sorted(saved["tokenizer"].keys() | now["tokenizer"].keys())
                 if saved["tokenizer"].get(n) != now["tokenizer"].get(n)]
        found["tokenizer"] = f"the tokenizer changed ({', '.join(names)} differ)"
    return found


def check_unchanged(meta: dict, now: dict, allowed: list, run_name: str, where: str) -> dict:
    """Refuse (ValueError) to resume the checkpoint `meta` on inputs whose fingerprint differs from the one it
    recorded, unless --allow-changed names each change; returns the allowed changes. A checkpoint without a
    fingerprint (older raychat) is not checked. Even allowed, a changed shard list or row-group layout is
    refused: the saved data positions would not fit it (the data stream checks the same)."""
    saved = meta.get("inputs")
    if not saved:
        return {}
    found = changes(saved, now)
    refused = {k: v for k, v in found.items() if k not in allowed}
    if refused:
        raise ValueError(f"run {run_name} would resume from step {meta['step']} ({where}) on other inputs than it "
                         f"was trained on: {'; '.join(refused.values())}. Restore them, or add --allow-changed "
                         f"{','.join(refused)} if the change is intended, or start a new --run-name")
    layout = lambda fp: [(s["name"], s["row_groups"]) for s in fp["data"]["train"]]  # noqa: E731
    if "data" in found and layout(saved) != layout(now):
        raise ValueError(f"run {run_name} cannot resume from step {meta['step']} ({where}) on these shards even with "
                         f"--allow-changed data: {found['data']}, and the saved data positions need the same shard "
                         "names and row groups. Restore the shards or start a new --run-name")
    return found
