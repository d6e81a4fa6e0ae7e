"""BestFitPacker against a plain linear-scan re-implementation of the reference packer (docs/REFERENCE.md §8), plus its stated properties."""
import json
import random

import numpy as np
import pytest
import torch

from raychat.data.packing import BestFitPacker, split_rows

BOS = 0


def make_docs(n, seed, max_len=40, min_len=1):
    """Documents as (ref, tokens): BOS then distinct non-BOS tokens, so every token traces back to its doc."""
    rng = random.Random(seed)
    docs, next_tok = [], 1
    for i in range(n):
        length = rng.randint(min_len, max_len)
        docs.append((i, [BOS] + list(range(next_tok, next_tok + length - 1))))
        next_tok += length - 1
    return docs


def reference_pack(docs, B, T, buffer_size, chunk, n_batches):
    """The reference loader's loop spelled out with linear scans over a list. Returns (batches, buffer refs)."""
    buffer, it, batches = [], iter(docs), []
    for _ in range(n_batches):
        rows = []
        for _ in range(B):
            row, pos = [], 0
            while pos < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(next(it) for _ in range(chunk))
                remaining = T + 1 - pos
                best, best_len = -1, 0
                for i, (_, toks) in enumerate(buffer):
                    if best_len < len(toks) <= remaining:  # strictly greater replaces: lowest index on ties
                        best, best_len = i, len(toks)
                if best >= 0:
                    _, toks = buffer.pop(best)
                    row += toks
                    pos += len(toks)
                else:
                    shortest = min(range(len(buffer)), key=lambda i: (len(buffer[i][1]), i))
                    _, toks = buffer.pop(shortest)
                    row += toks[:remaining]
                    pos = T + 1
            rows.append(row)
        batches.append(np.array(rows, dtype=np.int64))
    return batches, [ref for ref, _ in buffer]


def packer_batches(docs, B, T, buffer_size, chunk, n_batches, as_numpy=False):
    packer = BestFitPacker(B, T, buffer_size)
    it = iter(docs)

    def refill():
        chunk_docs = [next(it) for _ in range(chunk)]
        packer.add((r, np.asarray(t, dtype=np.int32)) if as_numpy else (r, t) for r, t in chunk_docs)

    return [packer.next_rows(refill) for _ in range(n_batches)], packer


@pytest.mark.parametrize("B,T,buffer_size,chunk,max_len,as_numpy", [
    (4, 32, 20, 7, 40, False),        # many documents longer than a row: crop path
    (2, 64, 50, 16, 20, True),        # mostly whole documents, many length ties
    (3, 16, 5, 3, 3, False),          # tiny docs, tiny buffer
    (2, 256, 1000, 128, 300, True),   # reference buffer and chunk sizes
])
def test_matches_linear_scan_reference(B, T, buffer_size, chunk, max_len, as_numpy):
    docs = make_docs(8000, seed=B * T + buffer_size, max_len=max_len)
    got, packer = packer_batches(docs, B, T, buffer_size, chunk, 6, as_numpy)
    expected, expected_buffer = reference_pack(docs, B, T, buffer_size, chunk, 6)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert packer.buffer_refs() == expected_buffer
    assert len(packer) == len(expected_buffer)


def test_row_properties():
    """BOS at every row start, no padding, whole docs then at most one cropped doc (the last), no doc twice."""
    B, T = 8, 48
    docs = make_docs(5000, seed=3, max_len=70)
    owner = {}  # token -> (doc ref, position in doc); BOS excluded (shared by all docs)
    lengths = {}
    for ref, toks in docs:
        lengths[ref] = len(toks)
        for p, t in enumerate(toks[1:], start=1):
            owner[t] = (ref, p)
    batches, _ = packer_batches(docs, B, T, 200, 32, 10)
    seen_docs = set()
    for rows in batches:
        assert rows.shape == (B, T + 1) and rows.dtype == np.int64
        assert (rows[:, 0] == BOS).all()
        for row in rows:
            # Split the row at BOS tokens into documents and check each against its source.
            starts = list(np.flatnonzero(row == BOS)) + [T + 1]
            assert starts[0] == 0
            for j, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
                piece = row[a:b]
                if len(piece) == 1:  # a BOS-only doc
                    continue
                ref, p = owner[int(piece[1])]
                assert p == 1, "a document must be placed from its start"
                assert ref not in seen_docs, "a document was placed twice"
                seen_docs.add(ref)
                expected = docs[ref][1][:len(piece)]
                assert list(piece) == expected
                if len(piece) < lengths[ref]:
                    assert j == len(starts) - 2, "only the last document of a row may be cropped"


def test_crop_takes_shortest_and_largest_fit_is_preferred():
    """Hand-made buffer: the best-fit rules pick exactly these documents."""
    packer = BestFitPacker(B=1, T=9, buffer_size=1)  # row of 10 tokens
    # lengths: a=6, b=4, c=4 (tie with b, later), d=12, e=11
    docs = [("a", [0] * 6), ("b", [0, 2, 2, 2]), ("c", [0, 3, 3, 3]), ("d", [0] + [4] * 11), ("e", [0] + [5] * 10)]
    packer.add(docs)
    rows = packer.next_rows(lambda: pytest.fail("refill must not be called while the buffer is full enough"))
    # 6 (largest fit of 10) then 4 (b: the earlier of the two 4s) fills the row exactly.
    assert rows.tolist() == [[0] * 6 + [0, 2, 2, 2]]
    assert packer.buffer_refs() == ["c", "d", "e"]
    rows = packer.next_rows(lambda: pytest.fail("no refill"))
    # c (4) fits; remaining 6: nothing fits (11, 12) -> crop the shortest (e, 11 tokens) to 6, discard the rest.
    assert rows.tolist() == [[0, 3, 3, 3, 0, 5, 5, 5, 5, 5]]
    assert packer.buffer_refs() == ["d"]


def test_buffer_refs_are_json_and_rebuild_identical_buffer():
    """Buffer refs + the source cursor are a complete state: a rebuilt packer continues identically."""
    docs = make_docs(4000, seed=11, max_len=60)
    B, T, bs, chunk = 2, 40, 100, 16

    def run(packer, cursor, n):
        def refill():
            packer.add(docs[cursor[0]:cursor[0] + chunk])
            cursor[0] += chunk
        return [packer.next_rows(refill) for _ in range(n)]

    packer, cursor = BestFitPacker(B, T, bs), [0]
    run(packer, cursor, 3)
    state = json.loads(json.dumps({"refs": packer.buffer_refs(), "cursor": cursor[0]}))
    expected = run(packer, cursor, 4)

    rebuilt = BestFitPacker(B, T, bs)
    rebuilt.add((r, docs[r][1]) for r in state["refs"])
    got = run(rebuilt, [state["cursor"]], 4)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


def test_split_rows_and_validation():
    rows = np.arange(2 * 5, dtype=np.int64).reshape(2, 5)
    x, y = split_rows(rows)
    assert x.dtype == torch.int64 and y.dtype == torch.int64 and x.shape == (2, 4) and y.shape == (2, 4)
    assert torch.equal(x[:, 1:], y[:, :-1]) and y[0, -1].item() == 4
    with pytest.raises(ValueError, match="T=0"):
        BestFitPacker(1, 0)
    with pytest.raises(ValueError, match="0 tokens"):
        BestFitPacker(1, 4).add([("empty", [])])
    with pytest.raises(RuntimeError, match="added no documents"):
        BestFitPacker(1, 4, buffer_size=2).next_rows(lambda: None)
