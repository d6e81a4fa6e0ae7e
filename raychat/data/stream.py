"""Per-slot document streams, tokenized by a Ray Data actor pool (or inline), packed, with exact resume.

What a slot reads (docs/ARCHITECTURE.md "slots"): slot `s` of `S` reads, in every
training file in sorted order, row groups s, s + S, s + 2S, ...; all slots walk the same file sequence;
after the last file a new epoch starts (epochs count from 1), forever. One epoch of a slot is therefore a
fixed list of (file, row group) pairs, its *schedule*, and the slot's infinite stream is the schedule
repeated. Item `k` of that stream is schedule[k % len] in epoch 1 + k // len, so a single integer names a
row group anywhere in the stream. Each row group's documents are tokenized with BOS prepended and handed
to the packer in chunks of up to 128 documents (the reference's tokenizer batch), exactly as the reference
refills its buffer; packing is raychat.data.packing.BestFitPacker.

Empty and whitespace-only documents are kept, as the reference keeps them: an empty one becomes a BOS-only
document of length 1, a whitespace-only one BOS plus its whitespace tokens (shards written by
`raychat.data prepare` contain neither). A null `text` is an error naming the file and row group.

Backends (identical batches; tests/test_stream.py checks it):
- "ray": a window of upcoming items becomes `ray.data.from_items`, mapped by `map_batches` with a callable
  class on `ActorPoolStrategy(min_size=1, max_size=actors)`; each actor loads the tokenizer once, reads
  its row group through pyarrow.fs and tokenizes it. The dataset's own context has `preserve_order=True`,
  so the training worker consumes row groups in stream order while the actors run ahead (Ray Data's
  streaming backpressure bounds how far).
  Why not `read_parquet` + `streaming_split`: in Ray 2.60 a split gives no deterministic per-rank
  assignment of row groups (blocks go to whichever consumer asks first) and a Ray Data iterator has no
  resumable position (no `state_dict()`), so a restart would replay or skip data. Here
  the position is ours: an item index plus a document offset.
- "inline": the same read+tokenize function in the calling process (no Ray): validation streams,
  benchmarks, and running without a cluster. One background thread per slot reads and tokenizes up to
  `prefetch` row groups ahead of the one being packed (tiktoken releases the GIL while it encodes), so the
  training thread waits only when tokenizing cannot keep up; its errors are raised on the training thread.

Resume is exact. `state_dict()` (JSON-able, {"version": 1, ...}) holds the cursor (item, doc) of the next
chunk and the packer's buffer as document references (item, doc index). Loading re-reads and re-tokenizes
the few row groups those references name (tokenization is deterministic), rebuilds the buffer in the same
order and continues; the next batches equal the uninterrupted stream's. This changes the reference on
purpose: its state is the last fetched chunk's (file, row group) and resume skips to the next block of
row groups, dropping the buffer.
"""
import collections
import functools
import itertools
import os
import queue
import threading
import time
import warnings
from typing import Iterator

import numpy as np

from raychat import storage
from raychat.data import shards
from raychat.data.packing import DEFAULT_BUFFER_SIZE, BestFitPacker, split_rows

STATE_VERSION = 1
DEFAULT_CHUNK_SIZE = 128  # the reference's tokenizer batch
DEFAULT_WINDOW = 1024  # row groups per Ray Data dataset; a new pipeline starts after each window
LOOKAHEAD_BYTES = 256 * 1024**2  # tokenized row groups a Ray Data stream may hold ahead of its trainer
# Ray Data's scheduling loop runs in the training worker's process and, once backpressure has stopped every
# task (the look-ahead is full: most of the time), it spins without waiting, holding the GIL: measured at a
# third of a CPU worker's CPU time at d4 (docs/LOG.md, ray#63544). A pause per loop step caps it at ~20 Hz (4% of
# a CPU); a row group arriving up to this much later costs nothing, the stream being that far ahead of the trainer.
SCHEDULER_PAUSE_S = 0.05
BACKENDS = ("ray", "inline")
CONVERT_DOCS = 32  # documents per list -> array copy in tokenize_row_group (~1 ms with the GIL held)


# ---- files and schedule ------------------------------------------------------------------------------

def inspect_files(files: list[str]) -> list[int]:
    """Validate every file cheaply from its parquet footer (readable, string `text` column); return the row
    group counts. Raises ShardError naming the file, before any Ray work starts."""
    if isinstance(files, str) or not files:
        raise ValueError(f"files={files!r}: pass a non-empty list of parquet shard paths (see "
                         "raychat.data.shards.split_shards)")
    counts = []
    for path in files:
        shards.validate_shard(path)
        counts.append(shards.num_row_groups(path))
    return counts


def slot_schedule(row_group_counts: list[int], slot: int, num_slots: int) -> list[tuple[int, int]]:
    """One epoch of a slot: (file index, row group) pairs, files in order, row groups slot, slot+S, ..."""
    return [(f, rg) for f, n in enumerate(row_group_counts) for rg in range(slot, n, num_slots)]


def tokenize_row_group(tokenizer, path: str, row_group: int, bos_id: int, threads: int):
    """Read one row group's `text` and tokenize it with BOS prepended.

    Returns (tokens int32 (N,), offsets int64 (docs + 1,)): document i is tokens[offsets[i]:offsets[i+1]].
    Both backends call this, so they see identical tokens. Errors name the file and row group.
    """
    try:
        texts = shards.read_row_group_texts(path, row_group)
    except (shards.ShardError, IndexError):
        raise
    except Exception as e:  # a damaged page behind a valid footer surfaces only here
        raise shards.ShardError(f"{path}: row group {row_group} cannot be read ({type(e).__name__}: {e}); the "
                                "file is corrupt: delete it and download or prepare it again") from e
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise shards.ShardError(f"{path}: row group {row_group}, row {bad} has a null `text`; every row must be a "
                                "document string")
    docs = tokenizer.encode(texts, prepend=bos_id, num_threads=threads) if texts else []
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    # A few documents per copy: one np.fromiter over a whole row group holds the GIL for ~30 ms per million
    # tokens, a stall for a training thread running beside the inline backend's read-ahead thread.
    for lo in range(0, len(docs), CONVERT_DOCS):
        hi = min(lo + CONVERT_DOCS, len(docs))
        tokens[offsets[lo]:offsets[hi]] = np.fromiter(itertools.chain.from_iterable(docs[lo:hi]), dtype=np.int32,
                                                      count=int(offsets[hi] - offsets[lo]))
    return tokens, offsets


class _Closed(Exception):
    """Handed to a consumer waiting on a _ReadAhead that was closed under it."""


class _ReadAhead:
    """Items first, first + 1, ... as (item, *produce(item)), produced on a daemon thread at most `depth` items
    ahead of the consumer (row groups read and tokenized; packed batches). An exception from `produce` is raised
    by the next __next__ (the same exception object, so the same type and message), and the thread stops there.

    The thread holds no reference to this object, only to the queue, the slots and the stop flag: an iterator
    dropped without close() is collected, and __del__ stops the thread."""

    def __init__(self, produce, first: int, depth: int, name: str = "raychat-tokenize"):
        self._error = None
        self._results = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)  # one per item produced and not yet consumed
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(produce, first, self._results, self._slots,
                                                               self._stop), name=name, daemon=True)
        self.thread.start()

    @staticmethod
    def _run(produce, first, results, slots, stop):
        for k in itertools.count(first):
            slots.acquire()
            if stop.is_set():
                return
            try:
                results.put((k, *produce(k)))
            except BaseException as e:  # handed to the consumer: the training thread reports it
                results.put(e)
                return

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:  # the thread has stopped: raise its error again rather than wait forever
            raise self._error
        result = self._results.get()
        if isinstance(result, BaseException):
            self._error = result
            raise result
        self._slots.release()
        return result

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; it finishes the item it is producing (if any) first, up to `timeout` seconds. A
        consumer blocked in __next__ on another thread gets _Closed."""
        self._stop.set()
        self._slots.release()  # wakes a thread waiting for a free slot
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)
        self._results.put(_Closed("closed"))

    def __del__(self):
        self._stop.set()
        self._slots.release()


# ---- the Ray Data actor --------------------------------------------------------------------------------

def _as_tokenizer(tokenizer):
    """A Tokenizer from a directory path, or the Tokenizer itself."""
    if isinstance(tokenizer, str):
        from raychat.tokenizer import Tokenizer

        return Tokenizer.from_directory(tokenizer)
    return tokenizer


@functools.cache
def _paced_scheduler():
    """A Ray Data execution callback that pauses the scheduling loop at every step (SCHEDULER_PAUSE_S)."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class PacedScheduler(ExecutionCallback):
        def on_execution_step(self, executor):
            time.sleep(SCHEDULER_PAUSE_S)

    return PacedScheduler


class _TokenizeRowGroups:
    """Ray Data callable class: loads the tokenizer once per actor; one input row = one row group."""

    def __init__(self, tokenizer, threads: int):
        self.tokenizer = _as_tokenizer(tokenizer)
        self.bos_id = self.tokenizer.get_bos_token_id()
        self.threads = threads

    def __call__(self, batch):
        import pyarrow as pa

        items, all_tokens, all_offsets = [], [], []
        for k, path, rg in zip(batch["item"].to_pylist(), batch["path"].to_pylist(), batch["rg"].to_pylist()):
            tokens, offsets = tokenize_row_group(self.tokenizer, path, rg, self.bos_id, self.threads)
            items.append(k)
            all_tokens.append(tokens)
            all_offsets.append(offsets)

        def ragged(arrays, dtype):
            starts = np.zeros(len(arrays) + 1, dtype=np.int64)
            np.cumsum([len(a) for a in arrays], out=starts[1:])
            return pa.LargeListArray.from_arrays(pa.array(starts), pa.array(np.concatenate(arrays).astype(dtype)))

        return pa.table({"item": pa.array(items, pa.int64()), "tokens": ragged(all_tokens, np.int32),
                         "offsets": ragged(all_offsets, np.int64)})


# ---- the document stream of one slot -------------------------------------------------------------------

class SlotDocuments:
    """The infinite, chunked document stream of one slot; position = (item, doc) of the next chunk.

    next_chunk() returns up to `chunk_size` documents [((item, doc), tokens int32), ...] of one row group,
    in stream order; `epoch` is the epoch of the row group the last chunk came from (1 before any).
    `prefetch` row groups are read ahead: by the inline backend's thread, or as Ray Data's prefetched batches.
    Read-ahead row groups are not part of the position: a resume reads them again.
    """

    def __init__(self, files: list[str], tokenizer_dir: str, slot: int, num_slots: int, *,
                 backend: str = "ray", chunk_size: int = DEFAULT_CHUNK_SIZE, tokenizer_threads: int = 4,
                 actors: int = 1, actor_num_cpus: float = 1, window: int = DEFAULT_WINDOW, prefetch: int = 2,
                 row_group_counts: list[int] | None = None, start: tuple[int, int] = (0, 0)):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {BACKENDS}")
        for name, value in (("num_slots", num_slots), ("chunk_size", chunk_size), ("actors", actors),
                            ("tokenizer_threads", tokenizer_threads), ("window", window), ("prefetch", prefetch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(slot, int) or not 0 <= slot < num_slots:
            raise ValueError(f"slot={slot!r} must be an integer in [0, num_slots={num_slots})")
        if isinstance(tokenizer_dir, str) and not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.pkl")):
            raise FileNotFoundError(f"tokenizer_dir={tokenizer_dir!r} holds no tokenizer.pkl; train one with "
                                    "`python -m scripts.tok_train`")
        self.files = [storage.absolute(f) for f in files] if isinstance(files, list) else files
        self.row_group_counts = list(row_group_counts) if row_group_counts is not None else inspect_files(self.files)
        if len(self.row_group_counts) != len(self.files):
            raise ValueError(f"row_group_counts has {len(self.row_group_counts)} entries for {len(self.files)} files")
        self.schedule = slot_schedule(self.row_group_counts, slot, num_slots)
        if not self.schedule:
            raise ValueError(f"slot {slot} of num_slots={num_slots} gets no row groups: the files have at most "
                             f"{max(self.row_group_counts)} row groups each. Use fewer slots (workers x "
                             "grad-accum steps) or shards with more row groups")
        # A directory, or a loaded Tokenizer: the trainer passes the object, so actors on nodes without the
        # tokenizer files receive it with their constructor arguments.
        self.tokenizer_dir = os.path.abspath(tokenizer_dir) if isinstance(tokenizer_dir, str) else tokenizer_dir
        self.slot, self.num_slots, self.backend = slot, num_slots, backend
        self.chunk_size, self.tokenizer_threads = chunk_size, tokenizer_threads
        self.actors, self.actor_num_cpus, self.window, self.prefetch = actors, actor_num_cpus, window, prefetch
        self._tokenizer = None
        item, doc = start
        self.epoch = 1  # PackedStream restores the saved epoch on resume
        # The current row group (tokens, offsets) and the next document in it. A resume inside a row group
        # re-reads that row group here; the source then starts at the following item.
        self._item, self._doc, self._current = item, doc, None
        if doc > 0:
            self._current = self._read_inline(item)
            if doc > len(self._current[1]) - 1:
                raise ValueError(f"stream state names document {doc} of item {item}, but that row group has "
                                 f"{len(self._current[1]) - 1} documents: the shards changed since the state "
                                 "was saved")
        self._source = None  # started lazily so a stream can be built (and state loaded) without Ray work

    # -- positions --

    def locate(self, item: int) -> tuple[int, str, int]:
        """(epoch, file path, row group) of stream item `item`."""
        f, rg = self.schedule[item % len(self.schedule)]
        return 1 + item // len(self.schedule), self.files[f], rg

    def position(self) -> tuple[int, int]:
        """(item, doc) of the next chunk; normalized to (item + 1, 0) at the end of a row group."""
        if self._current is not None and self._doc >= len(self._current[1]) - 1:
            return self._item + 1, 0
        return self._item, self._doc

    # -- reading --

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _as_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def _reader(self):
        """read(item) -> (tokens, offsets), referring to nothing of this object (the read-ahead thread runs it)."""
        tok, schedule, files, threads = self.tokenizer(), self.schedule, self.files, self.tokenizer_threads
        bos = tok.get_bos_token_id()

        def read(item: int):
            f, rg = schedule[item % len(schedule)]
            return tokenize_row_group(tok, files[f], rg, bos, threads)

        return read

    def _read_inline(self, item: int):
        return self._reader()(item)

    def read_items(self, items) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Tokenize the given items in-process (used to rebuild a buffer on resume)."""
        return {k: self._read_inline(k) for k in sorted(set(items))}

    def _inline_source(self, first: int) -> Iterator:
        return _ReadAhead(self._reader(), first, self.prefetch)

    def _ray_source(self, first: int) -> Iterator:
        import ray.data

        for lo in itertools.count(first, self.window):
            rows = []
            for k in range(lo, lo + self.window):
                _, path, rg = self.locate(k)
                rows.append({"item": k, "path": path, "rg": rg})
            # One block per row group: the actors can run ahead one row group at a time.
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            # from_items snapshots a copy of the current DataContext, so this changes only this dataset.
            ds.context.execution_options.preserve_order = True
            # An internal, endless stream: the trainer's step line is the progress report, not Data's bars.
            ds.context.enable_progress_bars = False
            # Run ahead of the trainer by a bounded amount (backpressure), not through the whole window: an
            # unbounded look-ahead tokenizes for minutes and takes the cores the training workers need.
            ds.context.execution_options.resource_limits = ray.data.ExecutionResources(
                object_store_memory=LOOKAHEAD_BYTES)
            ds.context.custom_execution_callback_classes = [_paced_scheduler()]
            # An actor tokenizes with as many threads as the CPUs it reserves, so it never oversubscribes them.
            actor_threads = max(1, int(self.actor_num_cpus))
            # No actor restarts or task retries inside Ray Data: a lost or crashing tokenizer fails the training
            # worker, and Ray Train's restart (bounded by --max-failures) resumes the stream exactly from the
            # checkpoint. Ray Data's default (restart forever) would retry a deterministic crash without end,
            # and logs an error per pool at start (ray#53727: its arguments live in the object store). Ray 2.60
            # has no named parameter for it yet; its own comment points to this keyword, which it deprecates.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                ds = ds.map_batches(_TokenizeRowGroups, batch_size=1, batch_format="pyarrow",
                                    fn_constructor_args=(self.tokenizer_dir, actor_threads),
                                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=self.actors),
                                    num_cpus=self.actor_num_cpus, max_restarts=0)
            for table in ds.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=self.prefetch):
                tokens_col, offsets_col = table.column("tokens"), table.column("offsets")
                for i, k in enumerate(table.column("item").to_pylist()):
                    yield k, tokens_col[i].values.to_numpy(), offsets_col[i].values.to_numpy()

    def _next_item(self):
        if self._source is None:
            first = self._item + 1 if self._current is not None else self._item
            self._source = (self._ray_source if self.backend == "ray" else self._inline_source)(first)
        k, tokens, offsets = next(self._source)
        expected = self._item + 1 if self._current is not None else self._item
        if k != expected:  # preserve_order is what guarantees this; fail loudly rather than train on a shuffle
            raise RuntimeError(f"slot {self.slot}: Ray Data delivered row group item {k}, expected {expected}")
        self._item, self._doc, self._current = k, 0, (tokens, offsets)

    def next_chunk(self) -> list:
        """The next up to chunk_size documents, as [((item, doc), tokens), ...] (never empty)."""
        empty_items = 0
        while self._current is None or self._doc >= len(self._current[1]) - 1:
            if self._current is not None:
                empty_items += 1
                if empty_items > len(self.schedule):
                    raise ValueError(f"slot {self.slot}: a whole epoch of its row groups holds no documents")
            self._next_item()
        tokens, offsets = self._current
        lo, hi = self._doc, min(self._doc + self.chunk_size, len(offsets) - 1)
        self._doc = hi
        self.epoch = 1 + self._item // len(self.schedule)
        return [((self._item, d), tokens[offsets[d]:offsets[d + 1]]) for d in range(lo, hi)]

    def close(self) -> None:
        """Stop the Ray Data pipeline (its actors) or the read-ahead thread now rather than at garbage collection."""
        if self._source is not None:
            self._source.close()
            self._source = None


# ---- the packed stream -------------------------------------------------------------------------------

class PackedStream:
    """Infinite iterator of (inputs, targets) int64 CPU tensors (B, T) for one slot, with exact resume.

    PackedStream(files, tokenizer_dir, B, T, slot, num_slots, state=None, backend="ray"|"inline", ...)
    - tokenizer_dir: a tokenizer directory, or a loaded raychat Tokenizer (shipped to the actors).
    - files: the training shards in order (or [val_file]); validated from their footers up front.
    - state: a dict from state_dict() (possibly through json): continue exactly where that stream was.
    - state_dict() may be called between any two batches; `epoch` is the epoch of the last fetched chunk.
    Use as a context manager (or call close()) to stop the Ray Data actors promptly.
    """

    def __init__(self, files: list[str], tokenizer_dir: str, B: int, T: int, slot: int = 0, num_slots: int = 1,
                 state: dict | None = None, backend: str = "ray", buffer_size: int = DEFAULT_BUFFER_SIZE,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, tokenizer_threads: int = 4, actors: int = 1,
                 actor_num_cpus: float = 1, window: int = DEFAULT_WINDOW, prefetch: int = 2,
                 row_group_counts: list[int] | None = None):
        self.packer = BestFitPacker(B, T, buffer_size)
        self.B, self.T = B, T
        counts = row_group_counts if row_group_counts is not None else inspect_files(files)
        start, refs = (0, 0), []
        if state is not None:
            start, refs = self._check_state(state, files, counts, slot, num_slots, B, T, buffer_size, chunk_size)
        self.docs = SlotDocuments(files, tokenizer_dir, slot, num_slots, backend=backend, chunk_size=chunk_size,
                                  tokenizer_threads=tokenizer_threads, actors=actors, actor_num_cpus=actor_num_cpus,
                                  window=window, prefetch=prefetch, row_group_counts=counts, start=start)
        if state is not None:
            self.docs.epoch = state["epoch"]
            items = self.docs.read_items({k for k, _ in refs})
            for k, d in refs:
                tokens, offsets = items[k]
                if d >= len(offsets) - 1:
                    raise ValueError(f"stream state buffers document {d} of item {k}, which has only "
                                     f"{len(offsets) - 1} documents: the shards changed since the state was saved")
                self.packer.add([((k, d), tokens[offsets[d]:offsets[d + 1]])])

    @staticmethod
    def _identity(files, counts, slot, num_slots, B, T, buffer_size, chunk_size) -> dict:
        # Basenames, not paths: a run may resume on another cluster where the shards live elsewhere.
        return {"slot": slot, "num_slots": num_slots, "files": [f.rstrip("/").rsplit("/", 1)[-1] for f in files],
                "row_group_counts": list(counts), "B": B, "T": T, "buffer_size": buffer_size,
                "chunk_size": chunk_size}

    def _check_state(self, state, files, counts, slot, num_slots, B, T, buffer_size, chunk_size):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version') if isinstance(state, dict) else state!r} "
                             f"is not {STATE_VERSION}; it was written by another raychat version: start the data "
                             "stream fresh (state=None) or use the matching raychat")
        want = self._identity(files, counts, slot, num_slots, B, T, buffer_size, chunk_size)
        for key, value in want.items():
            if state.get(key) != value:
                shown = (lambda v: v if not isinstance(v, list) or len(v) < 6 else f"[{len(v)} entries]")
                raise ValueError(f"stream state was saved with {key}={shown(state.get(key))}, this stream has "
                                 f"{key}={shown(value)}: an exact resume needs the same shards, slot layout "
                                 "(workers x grad-accum), B, T and buffer; restore those or start fresh")
        refs = [(int(k), int(d)) for k, docs in state["buffer"] for d in docs]
        return (int(state["item"]), int(state["doc"])), refs

    def __iter__(self):
        return self

    def __next__(self):
        rows = self.packer.next_rows(lambda: self.packer.add(self.docs.next_chunk()))
        return split_rows(rows)

    def next_rows(self) -> np.ndarray:
        """One batch as packed int64 rows (B, T + 1), without the tensor split (benchmarks, tests)."""
        return self.packer.next_rows(lambda: self.packer.add(self.docs.next_chunk()))

    @property
    def epoch(self) -> int:
        return self.docs.epoch

    def state_dict(self) -> dict:
        """JSON-able position: construct PackedStream(..., state=this) to continue with the very next batch."""
        buffer: list = []
        for k, d in self.packer.buffer_refs():  # buffer order is stream order: group by item
            if buffer and buffer[-1][0] == k:
                buffer[-1][1].append(d)
            else:
                buffer.append([k, [d]])
        item, doc = self.docs.position()
        d = self.docs
        state = {"version": STATE_VERSION, **self._identity(d.files, d.row_group_counts, d.slot, d.num_slots, self.B,
                                                            self.T, self.packer.buffer_size, d.chunk_size),
                 "epoch": self.epoch, "item": item, "doc": doc, "buffer": buffer}
        return state

    def close(self) -> None:
        self.docs.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SlotStreams:
    """This rank's training batches: one PackedStream per data slot it owns, read in slot order, one
    micro-batch per slot per step, delivered on the device.

    A background thread packs the batches up to a step ahead (packing is ~1 ms of Python per B 32 x T 2048
    batch, 1% of a d12 micro-batch on an H100), with each batch the state its stream had before it. The next
    batch also moves to the device while the accelerator still runs the last backward. `state_dict()` is
    therefore made of those recorded states, not of the streams, which are ahead: a resume starts with exactly
    the batches this run was about to train on.

    `take_data_wait()` returns the seconds the calling thread waited on the streams since the last call (the loop
    calls it once per step): ~0 while packing keeps ahead of training, the stall when it does not."""

    def __init__(self, files: list[str], tokenizer, B: int, T: int, slots: range, num_slots: int,
                 states: list | None, backend: str, actors: int, to_device, **stream_kwargs):
        states = states if states is not None else [None] * len(slots)
        self.streams = [PackedStream(files, tokenizer, B, T, slot=slot, num_slots=num_slots, state=state,
                                     backend=backend, actors=actors, **stream_kwargs)
                        for slot, state in zip(slots, states)]
        self._to_device = to_device
        streams, A = self.streams, len(self.streams)

        def pack(k: int):  # on the thread: refers to the streams only, not to this object
            stream = streams[k % A]
            state = stream.state_dict()
            x, y = next(stream)
            return state, x, y, stream.epoch

        self._ahead = _ReadAhead(pack, 0, depth=A + 1, name="raychat-pack")
        self._pending = collections.deque()  # (k, state, x, y, epoch) taken from the thread, not yet delivered
        self.epoch = 1  # slot 0's epoch after its last fetched batch, as the step line shows it
        self._data_wait = 0.0
        self._next = self._fetch()
        self._data_wait = 0.0  # that first fetch is start-up, not a step's wait

    def _take(self):
        t0 = time.perf_counter()
        item = next(self._ahead)
        self._data_wait += time.perf_counter() - t0
        return item

    def _fetch(self):
        """The next batch, on the device, with its slot and its stream's state before it."""
        k, state, x, y, epoch = self._pending.popleft() if self._pending else self._take()
        if k % len(self.streams) == 0:
            self.epoch = epoch
        t0 = time.perf_counter()
        x, y = self._to_device(x, y)
        self._data_wait += time.perf_counter() - t0
        return k % len(self.streams), state, x, y

    def take_data_wait(self) -> float:
        """Seconds the calling thread waited for batches since the last call."""
        wait, self._data_wait = self._data_wait, 0.0
        return wait

    def step_batches(self):
        """The step's micro-batches (x, y), one per owned slot. Each next batch is fetched when the caller asks
        for it, i.e. after the caller's backward of the previous one was queued."""
        for _ in range(len(self.streams)):
            _, _, x, y = self._next
            yield x, y
            self._next = self._fetch()

    def state_dict(self) -> list:
        """Each slot's stream state before its next undelivered batch."""
        states = {self._next[0]: self._next[1]}
        for k, state, *_ in self._pending:
            states.setdefault(k % len(self.streams), state)
        while len(states) < len(self.streams):  # the thread runs a step ahead: these batches are (nearly) ready
            item = self._take()
            self._pending.append(item)
            states.setdefault(item[0] % len(self.streams), item[1])
        return [states[a] for a in range(len(self.streams))]

    def close(self) -> None:
        self._ahead.close(timeout=0)  # the thread stops after the batch it is packing
        self._close_streams()  # an inline stream's close also wakes the thread if it waits for tokens
        self._ahead.thread.join(10)
        self._close_streams()  # a Ray Data stream the thread was still reading

    def _close_streams(self) -> None:
        for s in self.streams:
            try:
                s.close()
            except ValueError:  # "generator already executing": the pack thread is inside it; retried
                pass


def val_stream(val_file: str, tokenizer_dir: str, B: int, T: int, rank: int, world_size: int,
               backend: str = "inline", **kwargs) -> PackedStream:
    """A fresh validation stream: the val shard packed the same way, slot = rank of world_size, from its start.

    Build a new one for every evaluation (the reference restarts the val loader each time); it wraps into
    further epochs if the val shard is short. Inline by default: evaluation reads a few batches and a Ray
    Data pipeline costs ~1-2 s to start.
    """
    counts = inspect_files([val_file])
    # A short val shard may have fewer row groups than there are ranks; ranks then share row groups (rank r
    # reads slot r mod n), so every rank still evaluates the same number of batches. The reduced bpb stays a
    # token-weighted average over the batches read.
    n = min(world_size, counts[0])
    return PackedStream([val_file], tokenizer_dir, B, T, slot=rank % n, num_slots=n, backend=backend,
                        row_group_counts=counts, **kwargs)
