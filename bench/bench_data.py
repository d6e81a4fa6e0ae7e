"""Tokenizer and shard throughput, measured in one run (results in docs/BENCHMARKS.md).

    python bench/bench_data.py [--chars 5000000] [--vocab-size 4096]

Corpus: the Python stdlib sources prepared into shards (offline, the same on every machine). Prints
- prepare throughput (MB of source/s),
- tokenizer training throughput (chars/s) to --vocab-size,
- encode throughput: single-string loop vs batch with 1 and 2 threads, as ratios to the loop,
- compute_token_bytes time for the trained vocabulary.
"""
import argparse
import tempfile
import time

import torch

from raychat.data.shards import iter_texts, prepare, split_shards
from raychat.tokenizer import Tokenizer, compute_token_bytes, iter_cropped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=5_000_000, help="characters to train and encode on")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    args = p.parse_args()
    print(f"chars={args.chars:,} vocab_size={args.vocab_size} torch threads=1")
    if args.dry_run:
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        s = prepare("stdlib", out, shard_chars=10_000_000, progress=False)
        dt = time.perf_counter() - t0
        mb = (s.train_chars + s.val_chars) / 1e6
        print(f"prepare stdlib: {mb:.1f} M chars, {len(s.train_files)} shards in {dt:.2f}s = {mb / dt:.1f} M chars/s")
        train, _ = split_shards(out)
        docs = list(iter_cropped(iter_texts(train), args.chars, 10_000))
    n_chars = sum(map(len, docs))

    t0 = time.perf_counter()
    tok = Tokenizer.train_from_iterator(iter(docs), args.vocab_size)
    dt = time.perf_counter() - t0
    print(f"train: {n_chars / 1e6:.1f} M chars to vocab {tok.get_vocab_size()} in {dt:.2f}s = "
          f"{n_chars / dt / 1e6:.2f} M chars/s")

    t0 = time.perf_counter()
    single = [tok.encode(d) for d in docs]
    t_single = time.perf_counter() - t0
    n_tokens = sum(map(len, single))
    print(f"encode loop: {n_tokens / t_single / 1e6:.2f} M tokens/s ({n_chars / n_tokens:.2f} chars/token)")
    for threads in (1, 2):
        t0 = time.perf_counter()
        batch = tok.encode(docs, num_threads=threads)
        dt = time.perf_counter() - t0
        assert batch == single
        print(f"encode batch num_threads={threads}: {n_tokens / dt / 1e6:.2f} M tokens/s = {t_single / dt:.2f}x loop")

    for quirk in (False, True):
        t0 = time.perf_counter()
        compute_token_bytes(tok, quirk=quirk)
        print(f"compute_token_bytes(quirk={quirk}) for V={tok.get_vocab_size()}: {time.perf_counter() - t0:.3f}s")


if __name__ == "__main__":
    main()
