"""Train the BPE tokenizer on the train shards and save it to `<base>/tokenizer` (docs/REFERENCE.md §7).

    python -m scripts.tok_train                       # 2B chars, docs cropped to 10k chars, vocab 32768
    python -m scripts.tok_train --max-chars 50000000 --vocab-size 8192 --data-dir /path/to/shards

The text is the train split only (`raychat.data.shards.split_shards`: never the val shard), row group by
row group in order, each document cropped to --doc-cap characters, stopping right after the running total
exceeds --max-chars (the document that crosses it is still used).
"""
import argparse
import os
import sys
import time

import torch

from raychat.common import cli_parser, get_base_dir, run_cli
from raychat.data.shards import DEFAULT_SOURCE, SOURCES, default_data_dir, iter_texts, split_shards
from raychat.tokenizer import Tokenizer, iter_cropped

# Mixed scripts, digits, whitespace runs, an emoji and special-token text: must come back byte-identical.
ROUND_TRIP_TEXT = "Hello world! 12345 numbers,\n\ttabs   and spaces; Ünïcödé 你好 🚀 <|bos|> end.\n\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli_parser("scripts.tok_train", "Train the BPE tokenizer (rustbpe) on the train shards")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    p.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size including the 9 special tokens")
    p.add_argument("--data-dir", default=None, help="shard directory or URI (default: --source's directory)")
    p.add_argument("--source", default=DEFAULT_SOURCE, choices=list(SOURCES),
                   help="whose shards when --data-dir is not given: <base>/base_data (fineweb-edu, the seed recipe's) "
                        "or <base>/base_data_climbmix (climbmix, --recipe 2026-07's)")
    p.add_argument("--base-dir", default=None, help="base directory (default $RAYCHAT_BASE_DIR or ~/.cache/raychat)")
    p.add_argument("--token-bytes-quirk", action="store_true",
                   help="write the reference's 07c4dd4 token_bytes (U+FFFD counted as 3 bytes), to compare bpb "
                        "with its published numbers")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    args = p.parse_args(argv)
    if args.max_chars < 1:
        p.error(f"--max-chars={args.max_chars} must be >= 1")
    if args.doc_cap < 1:
        p.error(f"--doc-cap={args.doc_cap} must be >= 1")
    if args.vocab_size < 256 + 9:
        p.error(f"--vocab-size={args.vocab_size} must be >= 265 (256 byte tokens + 9 special tokens)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or default_data_dir(args.base_dir, create=not args.dry_run, source=args.source)
    out_dir = os.path.join(get_base_dir(args.base_dir, create=not args.dry_run), "tokenizer")
    print(f"max_chars={args.max_chars:,} doc_cap={args.doc_cap:,} vocab_size={args.vocab_size:,} "
          f"token_bytes_quirk={args.token_bytes_quirk}\ndata_dir={data_dir}\noutput={out_dir}", flush=True)
    if args.dry_run:
        return 0

    train_files, _ = split_shards(data_dir)
    print(f"training on {len(train_files)} train shards", flush=True)
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(iter_cropped(iter_texts(train_files), args.max_chars, args.doc_cap),
                                              args.vocab_size)
    train_time = time.time() - t0
    print(f"train time: {train_time:.2f}s, vocab size {tokenizer.get_vocab_size():,}", flush=True)

    decoded = tokenizer.decode(tokenizer.encode(ROUND_TRIP_TEXT))
    if decoded != ROUND_TRIP_TEXT:
        raise RuntimeError(f"the trained tokenizer does not round-trip {ROUND_TRIP_TEXT!r}: got {decoded!r}")

    tokenizer.save(out_dir, token_bytes_quirk=args.token_bytes_quirk)
    token_bytes = torch.load(os.path.join(out_dir, "token_bytes.pt"), weights_only=True)
    nonzero = token_bytes[token_bytes > 0].float()
    print(f"saved {out_dir}/tokenizer.pkl and token_bytes.pt; token_bytes (non-special): "
          f"min {int(nonzero.min())}, max {int(nonzero.max())}, mean {nonzero.mean():.3f}, std {nonzero.std():.3f}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
