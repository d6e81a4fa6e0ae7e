"""BOS-aligned best-fit packing of tokenized documents into rows of T + 1 tokens (docs/REFERENCE.md §8).

The packer holds a buffer of documents and builds each row of `T + 1` tokens like the reference loader:

    while the row is not full:
        refill until the buffer holds >= buffer_size documents
        remaining = T + 1 - pos
        take the LARGEST buffered document with len <= remaining (earliest-buffered on ties) and append it
        if none fits: take the SHORTEST document (earliest-buffered on ties), append its first `remaining`
        tokens and discard the rest; the row is full

Properties of every batch, given documents that each start with BOS (the stream prepends it):
- every row starts with BOS at position 0 (the first document placed into an empty row is whole or cropped
  from its start, and either way begins with BOS);
- a row holds whole documents followed by at most one cropped document, which is always the last one;
- there is no padding and no ignore index: all B * (T + 1) slots hold real tokens;
- documents are placed at most once; the tokens cut off a cropped document are dropped (not re-buffered);
- the result depends only on the order of documents handed to the packer, never on timing.

Speed: the reference scans the whole 1000-document buffer per placement in Python. Here documents are
bucketed by length (one FIFO per length plus a sorted list of the lengths present), so a placement is one
bisect. Buffer positions in the reference are insertion order (appends at the end, removals keep the order),
so "lowest index" among documents of one length is "earliest inserted" = the head of that length's FIFO:
the choices are identical, and tests/test_packing.py checks it against a plain linear-scan packer.

Resume: each document carries an opaque, JSON-able reference (the stream uses [item, doc]). `buffer_refs()`
lists the buffered documents' references in buffer order; re-adding the same documents in that order
rebuilds an identical buffer (see raychat/data/stream.py). No Ray here: this is pure Python/numpy.
"""
from bisect import bisect_right, insort
from collections import deque
from typing import Any, Callable, Iterable

import numpy as np

DEFAULT_BUFFER_SIZE = 1000  # the reference dataloader's buffer_size


class BestFitPacker:
    """Packs documents into (B, T + 1) int64 rows with the reference's best-fit rule.

    add(docs) appends (ref, tokens) pairs to the buffer in order; next_rows(refill) builds one batch, calling
    `refill()` (which must add at least one document, e.g. by calling add) whenever the buffer holds fewer
    than buffer_size documents before a placement, exactly when the reference refills.
    """

    def __init__(self, B: int, T: int, buffer_size: int = DEFAULT_BUFFER_SIZE):
        for name, value in (("B", B), ("T", T), ("buffer_size", buffer_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BestFitPacker: {name}={value!r} must be a positive integer")
        self.B, self.T, self.buffer_size = int(B), int(T), int(buffer_size)
        self._by_len: dict[int, deque] = {}  # length -> FIFO of (seq, ref, tokens), seq increasing
        self._lengths: list[int] = []  # sorted distinct lengths present in the buffer
        self._seq = 0  # insertion counter: buffer order == seq order
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, docs: Iterable[tuple[Any, Any]]) -> None:
        """Append documents (ref, tokens) to the buffer, in order. tokens: 1-D int array or list, non-empty."""
        for ref, tokens in docs:
            n = len(tokens)
            if n == 0:
                # An empty document would never advance a row (and could not start it with BOS).
                raise ValueError(f"BestFitPacker.add: document {ref!r} has 0 tokens; every document needs at "
                                 "least its BOS token (prepend BOS when tokenizing)")
            fifo = self._by_len.get(n)
            if fifo is None:
                fifo = self._by_len[n] = deque()
                insort(self._lengths, n)
            fifo.append((self._seq, ref, tokens))
            self._seq += 1
            self._count += 1

    def _pop(self, n: int) -> tuple[Any, Any]:
        fifo = self._by_len[n]
        _, ref, tokens = fifo.popleft()
        if not fifo:
            del self._by_len[n]
            self._lengths.pop(bisect_right(self._lengths, n) - 1)
        self._count -= 1
        return ref, tokens

    def next_rows(self, refill: Callable[[], None]) -> np.ndarray:
        """Build one batch: an int64 array (B, T + 1). inputs = rows[:, :-1], targets = rows[:, 1:]."""
        width = self.T + 1
        rows = np.empty((self.B, width), dtype=np.int64)
        for r in range(self.B):
            row = rows[r]
            pos = 0
            while pos < width:
                while self._count < self.buffer_size:
                    before = self._seq
                    refill()
                    if self._seq == before:
                        raise RuntimeError("BestFitPacker: refill() added no documents; the document source "
                                           "must be infinite (the stream cycles through epochs)")
                remaining = width - pos
                i = bisect_right(self._lengths, remaining) - 1
                if i >= 0:  # largest document that fits, earliest on ties
                    n = self._lengths[i]
                    _, tokens = self._pop(n)
                    row[pos:pos + n] = tokens
                    pos += n
                else:  # nothing fits: crop the shortest, earliest on ties; the rest is discarded
                    _, tokens = self._pop(self._lengths[0])
                    row[pos:] = tokens[:remaining]
                    pos = width
        return rows

    def buffer_refs(self) -> list:
        """References of the buffered documents in buffer (insertion) order."""
        entries = [e for fifo in self._by_len.values() for e in fifo]
        entries.sort(key=lambda e: e[0])
        return [ref for _, ref, _ in entries]


def split_rows(rows: np.ndarray):
    """(inputs, targets) int64 CPU torch tensors (B, T) from packed rows (B, T + 1)."""
    import torch

    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
