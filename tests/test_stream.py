"""PackedStream / SlotDocuments / SlotStreams on real parquet shards and a real tokenizer; Ray Data against
inline (the Ray tests are slow: each pipeline start costs seconds)."""
import itertools
import json
import random
import re
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raychat.data import stream as stream_module
from raychat.data.shards import ShardError
from raychat.data.stream import PackedStream, SlotDocuments, SlotStreams, inspect_files, slot_schedule, val_stream
from raychat.tokenizer import Tokenizer

ROWS_PER_GROUP = 16
ROW_GROUPS = [5, 3, 4]  # three shards of uneven size: slots get different numbers of row groups per file
SMALL = dict(B=2, T=32, buffer_size=40, chunk_size=8)  # epochs in a few dozen batches


@pytest.fixture(scope="module")
def corpus(shakespeare_path, tmp_path_factory):
    """(files, tokenizer_dir, texts by (file, rg, doc)): real shards cut from tinyshakespeare paragraphs."""
    root = tmp_path_factory.mktemp("stream")
    paras = re.split(r"\n\s*\n", open(shakespeare_path, encoding="utf-8").read())
    tok = Tokenizer.train_from_iterator(iter(paras[:2000]), 300)
    tok_dir = str(root / "tokenizer")
    tok.save(tok_dir)
    paras[3], paras[7] = "", "  \n "  # an empty and a whitespace-only document: kept, as the reference does
    files, texts, at = [], {}, 0
    for f, n_rg in enumerate(ROW_GROUPS):
        docs = paras[at:at + n_rg * ROWS_PER_GROUP]
        at += len(docs)
        path = str(root / f"shard_{f:05d}.parquet")
        pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), path, row_group_size=ROWS_PER_GROUP)
        files.append(path)
        for i, text in enumerate(docs):
            texts[(f, i // ROWS_PER_GROUP, i % ROWS_PER_GROUP)] = text
    return files, tok_dir, texts


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_shape_bos_and_determinism(corpus):
    files, tok_dir, _ = corpus
    bos = Tokenizer.from_directory(tok_dir).get_bos_token_id()
    a = take(PackedStream(files, tok_dir, backend="inline", **SMALL), 30)
    b = take(PackedStream(files, tok_dir, backend="inline", **SMALL), 30)
    assert_same(a, b)
    for x, y in a:
        assert x.shape == (2, 32) and y.shape == (2, 32) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == bos).all(), "every row starts with BOS"
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert len({x.sum().item() for x, _ in a}) > 1  # not one batch repeated


def test_slots_partition_documents_over_an_epoch(corpus):
    """Each slot's epoch-1 documents are whole row groups s, s+S, ... of each file; slots are disjoint and
    together hold every document exactly once, tokenized with BOS prepended, in stream order."""
    files, tok_dir, texts = corpus
    tok = Tokenizer.from_directory(tok_dir)
    bos = tok.get_bos_token_id()
    for num_slots in (1, 2, 3):
        seen = {}
        for slot in range(num_slots):
            docs = SlotDocuments(files, tok_dir, slot, num_slots, backend="inline", chunk_size=5)
            order = []
            while True:
                chunk = docs.next_chunk()
                if docs.epoch > 1:
                    break
                assert 1 <= len(chunk) <= 5
                for (item, d), tokens in chunk:
                    _, path, rg = docs.locate(item)
                    key = (files.index(path), rg, d)
                    assert rg % num_slots == slot
                    assert key not in seen, f"{key} read by slots {seen.get(key)} and {slot}"
                    seen[key] = slot
                    assert tokens.tolist() == tok.encode(texts[key], prepend=bos)
                    order.append(key)
            assert order == sorted(order), "files in order, row groups ascending, documents in order"
        assert set(seen) == set(texts)
    # the kept degenerate documents: BOS-only for "", BOS + whitespace tokens for whitespace
    assert tok.encode(texts[(0, 0, 3)], prepend=bos) == [bos]
    assert len(tok.encode(texts[(0, 0, 7)], prepend=bos)) > 1


def test_resume_is_exact_everywhere(corpus):
    """Resume after every batch of > 1 epoch equals the uninterrupted stream; the positions tried include
    mid-row-group, a buffer spanning two files and one spanning two epochs. States survive JSON."""
    files, tok_dir, _ = corpus
    stream = PackedStream(files, tok_dir, slot=1, num_slots=2, backend="inline", **SMALL)
    states, batches = [], []
    while stream.epoch < 3:
        states.append(json.loads(json.dumps(stream.state_dict())))
        batches.append(next(stream))
    mid_row_group = across_files = across_epochs = 0
    probe = SlotDocuments(files, tok_dir, 1, 2, backend="inline")
    for i in range(0, len(states) - 3):
        s = states[i]
        places = [probe.locate(k) for k, _ in s["buffer"]] + [probe.locate(s["item"])]
        mid_row_group += s["doc"] > 0
        across_files += len({(e, p) for e, p, _ in places}) > 1
        across_epochs += len({e for e, _, _ in places}) > 1
        resumed = PackedStream(files, tok_dir, slot=1, num_slots=2, state=s, backend="inline", **SMALL)
        assert resumed.epoch == s["epoch"]
        assert_same(take(resumed, 3), batches[i:i + 3])
        assert resumed.state_dict() == states[i + 3]
    assert mid_row_group and across_files and across_epochs, (mid_row_group, across_files, across_epochs)


def test_resume_refuses_a_different_layout(corpus):
    files, tok_dir, _ = corpus
    stream = PackedStream(files, tok_dir, backend="inline", **SMALL)
    take(stream, 3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="num_slots=1.*num_slots=2"):
        PackedStream(files, tok_dir, slot=0, num_slots=2, state=state, backend="inline", **SMALL)
    with pytest.raises(ValueError, match="files=.*same shards"):
        PackedStream(files[:2], tok_dir, state=state, backend="inline", **SMALL)
    with pytest.raises(ValueError, match="version 0 is not 1"):
        PackedStream(files, tok_dir, state={**state, "version": 0}, backend="inline", **SMALL)


def test_val_stream_restarts_and_wraps(corpus):
    files, tok_dir, _ = corpus
    val_file = files[1]  # 3 row groups: rank 1 of 2 gets one row group, so it wraps within a few batches
    first = take(val_stream(val_file, tok_dir, 2, 32, rank=1, world_size=2, buffer_size=20, chunk_size=8), 12)
    again = val_stream(val_file, tok_dir, 2, 32, rank=1, world_size=2, buffer_size=20, chunk_size=8)
    assert_same(take(again, 12), first)
    assert again.epoch > 2
    other = take(val_stream(val_file, tok_dir, 2, 32, rank=0, world_size=2, buffer_size=20, chunk_size=8), 1)
    assert not torch.equal(other[0][0], first[0][0])


def test_slot_streams_resume_at_the_batch_about_to_be_trained(corpus):
    """A rank's SlotStreams fetch the next step's first batch ahead; a state taken after a step (a save point)
    still resumes with exactly that batch, and with every later step's batches, for each slot."""
    files, tok_dir, _ = corpus

    def streams(state=None):
        return SlotStreams(files, tok_dir, SMALL["B"], SMALL["T"], range(0, 2), 2, state, backend="inline",
                           actors=1, to_device=lambda *t: t)

    def steps(s, n):
        return [list(s.step_batches()) for _ in range(n)]

    run = streams()
    before = steps(run, 5)
    state = json.loads(json.dumps(run.state_dict()))
    after = steps(run, 4)
    resumed = streams(state)
    again = steps(resumed, 4)
    for step_a, step_b in zip(after, again):
        assert len(step_a) == len(step_b) == 2  # one micro-batch per owned slot
        assert_same(step_a, step_b)
    assert not torch.equal(before[-1][0][0], after[0][0][0])
    assert resumed.state_dict() == run.state_dict()


# ---- the inline backend's read-ahead thread ------------------------------------------------------------

def read_synchronously(self, first):
    """The inline source without a thread: each row group read when the packer asks for it."""
    for k in itertools.count(first):
        yield (k, *self._read_inline(k))


def test_read_ahead_gives_the_synchronous_batches_and_states(corpus, monkeypatch):
    """Whatever the read-ahead depth and however the reads are timed, the batches and the state after each of
    them equal reading each row group when it is needed; read-ahead row groups are not part of the state,
    and a resume from any of those states continues exactly."""
    files, tok_dir, _ = corpus

    def run(n, **kwargs):
        with PackedStream(files, tok_dir, slot=1, num_slots=2, backend="inline", **SMALL, **kwargs) as s:
            batches, states = [], []
            for _ in range(n):
                batches.append(next(s))
                states.append(json.loads(json.dumps(s.state_dict())))
        return batches, states

    with monkeypatch.context() as m:
        m.setattr(SlotDocuments, "_inline_source", read_synchronously)
        expected, expected_states = run(40)
    assert expected_states[-1]["epoch"] > 1
    tokenize = stream_module.tokenize_row_group
    rng = random.Random(0)

    def jittery(*args):  # the thread sometimes behind the packer, sometimes ahead
        time.sleep(rng.choice([0, 0, 0.002, 0.01]))
        return tokenize(*args)

    monkeypatch.setattr(stream_module, "tokenize_row_group", jittery)
    for prefetch in (1, 2, 3):
        batches, states = run(40, prefetch=prefetch)
        assert_same(batches, expected)
        assert states == expected_states
    resumed = PackedStream(files, tok_dir, slot=1, num_slots=2, state=expected_states[9], backend="inline",
                           **SMALL)
    assert_same(take(resumed, 5), expected[10:15])
    resumed.close()


def test_read_ahead_is_bounded_and_close_stops_the_thread(corpus, monkeypatch):
    files, tok_dir, _ = corpus
    read = []
    tokenize = stream_module.tokenize_row_group
    monkeypatch.setattr(stream_module, "tokenize_row_group", lambda tok, path, rg, *a: (read.append(rg), tokenize(
        tok, path, rg, *a))[1])
    docs = SlotDocuments(files, tok_dir, 0, 1, backend="inline", chunk_size=ROWS_PER_GROUP, prefetch=2)
    assert docs._source is None  # the thread starts with the first read
    docs.next_chunk()  # item 0, all of it: items 1 and 2 may be read ahead, no more
    thread = docs._source.thread
    deadline = time.time() + 10
    while len(read) < 3 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(read) == 3, read
    assert thread.is_alive() and thread.daemon
    docs.close()
    assert not thread.is_alive()
    assert docs.position() == (1, 0)  # the read-ahead row groups are not consumed

    # A stream dropped without close() stops its thread too: the thread holds no reference to it.
    dropped = PackedStream(files, tok_dir, backend="inline", **SMALL)
    next(dropped)
    thread = dropped.docs._source.thread
    del dropped
    thread.join(10)
    assert not thread.is_alive()


def test_a_corrupt_row_group_fails_on_the_training_thread(corpus, tmp_path):
    """A page damaged behind a valid footer is found only when its row group is read, by the read-ahead
    thread: the error is raised by next() on the consumer's thread, again on every later call, with the
    message naming the file and row group."""
    _, tok_dir, _ = corpus
    path = str(tmp_path / "damaged.parquet")
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(8)]}), path, row_group_size=4,
                   compression="none")
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    open(path, "wb").write(bytes(data))
    stream = PackedStream([path], tok_dir, 1, 16, backend="inline", buffer_size=2, chunk_size=2)
    caller = threading.current_thread()
    for _ in range(2):
        with pytest.raises(ShardError, match="(?s)damaged.parquet: row group 1 cannot be read .*the file is corrupt"):
            while True:  # row group 0 is fine: its batches come first
                next(stream)
                assert threading.current_thread() is caller
    assert not stream.docs._source.thread.is_alive()
    stream.close()


def test_slot_streams_measure_the_data_wait(corpus, monkeypatch):
    """take_data_wait(): the seconds the streams made the caller wait since the last call, then zero."""
    files, tok_dir, _ = corpus
    tokenize = stream_module.tokenize_row_group

    def slow(*args):
        time.sleep(0.05)
        return tokenize(*args)

    monkeypatch.setattr(stream_module, "tokenize_row_group", slow)
    streams = SlotStreams(files, tok_dir, SMALL["B"], SMALL["T"], range(0, 1), 1, None, backend="inline",
                          actors=1, to_device=lambda *t: t, prefetch=1, buffer_size=SMALL["buffer_size"],
                          chunk_size=SMALL["chunk_size"])
    assert streams.take_data_wait() == 0.0  # the first batch, fetched at construction, is start-up
    waits = []
    while streams.streams[0].docs.position()[0] < 8:
        list(streams.step_batches())
        waits.append(streams.take_data_wait())
    assert streams.take_data_wait() == 0.0
    # each new row group is read when the packer first needs it (prefetch 1): >= 5 waits of ~50 ms
    assert sum(waits) >= 0.2 and sum(w > 0.02 for w in waits) >= 4, waits
    streams.close()


def test_slot_streams_pack_on_a_thread_that_reports_errors_and_ends_with_close(corpus, monkeypatch):
    """Batches are packed a step ahead on a background thread: an error there (a corrupt row group) is raised
    on the caller's thread with its own message, and close() ends the thread."""
    files, tok_dir, _ = corpus
    tokenize, calls = stream_module.tokenize_row_group, []

    def failing(tokenizer, path, row_group, *args):
        calls.append(row_group)
        if len(calls) > 3:
            raise stream_module.shards.ShardError(f"{path}: row group {row_group} is corrupt")
        return tokenize(tokenizer, path, row_group, *args)

    def streams():
        return SlotStreams(files, tok_dir, SMALL["B"], SMALL["T"], range(0, 2), 2, None, backend="inline",
                           actors=1, to_device=lambda *t: t, buffer_size=SMALL["buffer_size"],
                           chunk_size=SMALL["chunk_size"])

    run = streams()
    list(run.step_batches())
    assert run._ahead.thread.is_alive()
    run.close()
    assert not run._ahead.thread.is_alive()

    monkeypatch.setattr(stream_module, "tokenize_row_group", failing)
    with pytest.raises(stream_module.shards.ShardError, match="is corrupt"):
        broken = streams()
        for _ in range(50):
            list(broken.step_batches())


@pytest.mark.slow
def test_ray_data_backend_matches_inline_and_resumes(corpus, ray_local, monkeypatch):
    """2 actors, windows of 6 row groups so the epoch boundary (item 7) falls inside the second window, then a
    resume mid-row-group with one more pipeline. Ray Data's scheduling loop, a thread of the training process,
    pauses at each of its steps (stream.SCHEDULER_PAUSE_S): without the pause it spun holding the GIL once
    backpressure had stopped every task, while the trainer computed (bench/bench_stream_idle.py measures the CPU
    it takes)."""
    files, tok_dir, _ = corpus
    from ray.data import DataContext

    from raychat.data import stream

    pauses = []

    class CountingTime:
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            pauses.append(seconds)
            time.sleep(seconds)

    monkeypatch.setattr(stream, "time", CountingTime())
    inline = PackedStream(files, tok_dir, slot=0, num_slots=2, backend="inline", **SMALL)
    expected, states = [], []
    while inline.epoch < 2 or len(expected) < 40:
        states.append(inline.state_dict())
        expected.append(next(inline))
    with PackedStream(files, tok_dir, slot=0, num_slots=2, backend="ray", actors=2, window=6, **SMALL) as ray_stream:
        assert_same(take(ray_stream, len(expected)), expected)
        assert ray_stream.state_dict() == inline.state_dict()
    assert pauses and set(pauses) == {stream.SCHEDULER_PAUSE_S}, "the scheduling loop was not paced"
    assert inline.state_dict()["item"] > 6, "the Ray stream crossed a window boundary"
    assert DataContext.get_current().execution_options.preserve_order is False  # the global was left alone
    i = max(i for i, s in enumerate(states) if s["doc"] > 0)
    with PackedStream(files, tok_dir, slot=0, num_slots=2, state=json.loads(json.dumps(states[i])), backend="ray",
                      window=6, **SMALL) as resumed:
        assert_same(take(resumed, len(expected) - i), expected[i:])


# ---- bad inputs -----------------------------------------------------------------------------------------

def test_bad_files_fail_before_any_work(corpus, tmp_path):
    files, tok_dir, _ = corpus
    with pytest.raises(ValueError, match="non-empty list"):
        PackedStream([], tok_dir, 2, 32, backend="inline")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(open(files[0], "rb").read()[:200])
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), no_text)
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"text": pa.array([b"\xff\xfe", b"ok"], pa.binary())}), binary)
    missing = tmp_path / "missing.parquet"
    for path, pattern in ((truncated, "truncated.parquet is not a readable parquet"),
                          (no_text, "no_text.parquet has no `text` column"),
                          (binary, "binary.parquet: column `text` has type binary"),
                          (missing, "missing.parquet does not exist")):
        with pytest.raises(ShardError, match=pattern):
            PackedStream([files[0], str(path)], tok_dir, 2, 32, backend="ray")  # raises before Ray starts


def test_bad_arguments(corpus, tmp_path):
    files, tok_dir, _ = corpus
    with pytest.raises(ValueError, match=r"slot=2 must be an integer in \[0, num_slots=2\)"):
        PackedStream(files, tok_dir, 2, 32, slot=2, num_slots=2, backend="inline")
    with pytest.raises(ValueError, match="slot 5 of num_slots=6 gets no row groups"):
        PackedStream(files, tok_dir, 2, 32, slot=5, num_slots=6, backend="inline")
    with pytest.raises(ValueError, match="backend='spark'"):
        PackedStream(files, tok_dir, 2, 32, backend="spark")
    with pytest.raises(FileNotFoundError, match="no tokenizer.pkl"):
        PackedStream(files, str(tmp_path), 2, 32, backend="inline")
    with pytest.raises(ValueError, match="T=0"):
        PackedStream(files, tok_dir, 2, 0, backend="inline")


def test_null_document_is_an_error_naming_the_row_group(corpus, tmp_path):
    _, tok_dir, _ = corpus
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": pa.array(["fine", None, "also fine"], pa.string())}), path)
    stream = PackedStream([str(path)], tok_dir, 1, 8, backend="inline", buffer_size=2, chunk_size=2)
    with pytest.raises(ShardError, match="nulls.parquet: row group 0, row 1 has a null `text`"):
        next(stream)


def test_schedule_and_inspect(corpus):
    files, _, _ = corpus
    assert inspect_files(files) == ROW_GROUPS
    assert slot_schedule([5, 3, 4], 1, 2) == [(0, 1), (0, 3), (1, 1), (2, 1), (2, 3)]
    assert slot_schedule([1, 1], 1, 2) == []
    assert np.array_equal(np.array(slot_schedule([2], 0, 1)), np.array([(0, 0), (0, 1)]))
