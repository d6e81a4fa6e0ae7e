"""`python -m raychat.data {download,prepare}`: fetch FineWeb-Edu or ClimbMix shards, or turn local text into shards.

    python -m raychat.data download -n 8 -w 4          # FineWeb-Edu shards 0..7 plus the val shard 1822
    python -m raychat.data download -n 8 --source climbmix  # ClimbMix 0..7 + val 6542, in <base>/base_data_climbmix
    python -m raychat.data prepare --from stdlib       # offline: the Python stdlib sources as a corpus
    python -m raychat.data prepare --from my_corpus/ --out /tmp/my_shards  # .txt/.jsonl/.parquet files
"""
import argparse
import sys

from raychat.common import HelpFormatter, cli_parser, run_cli
from raychat.data import shards


def parse_args(argv=None) -> argparse.Namespace:
    p = cli_parser("raychat.data", __doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    fineweb, climbmix = shards.SOURCES["fineweb-edu"], shards.SOURCES["climbmix"]
    d = sub.add_parser("download", formatter_class=HelpFormatter,
                       help="download FineWeb-Edu or ClimbMix shards (always includes the val shard)")
    d.add_argument("--source", choices=list(shards.SOURCES), default=shards.DEFAULT_SOURCE,
                   help=f"dataset: fineweb-edu (default; {fineweb.num_shards} shards, the seed recipe's data) or "
                        f"climbmix ({climbmix.num_shards} shards, the data the 2026-07 recipe trains on)")
    d.add_argument("-n", "--num-shards", type=int, default=-1,
                   help=f"download train shards 0..N-1, and always the source's last shard, its val shard "
                        f"({fineweb.val_index} or {climbmix.val_index}); -1 = all")
    d.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    d.add_argument("--data-dir", default=None,
                   help=f"destination directory or URI (default <base>/{fineweb.subdir} for fineweb-edu, "
                        f"<base>/{climbmix.subdir} for climbmix)")
    d.add_argument("--base-url", default=None,
                   help="URL pattern with {i:05d} for the shard index (default: the source's on Hugging Face)")
    d.add_argument("--base-dir", default=None, help="base directory (default $RAYCHAT_BASE_DIR or ~/.cache/raychat)")
    d.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")

    r = sub.add_parser("prepare", formatter_class=HelpFormatter, help="turn local .txt/.jsonl/.parquet (or 'stdlib') into shards + val.parquet")
    r.add_argument("--from", dest="source", required=True,
                   help="a .txt/.jsonl/.parquet file, a folder of them (recursive), or 'stdlib'")
    r.add_argument("--out", default=None, help="output directory or URI (default <base>/base_data)")
    r.add_argument("--rows-per-group", type=int, default=1024, help="documents per parquet row group")
    r.add_argument("--shard-chars", type=int, default=250_000_000,
                   help="cut a shard once it holds this many characters (at a row-group boundary)")
    r.add_argument("--val-fraction", type=float, default=0.01,
                   help="every round(1/f)-th document goes to val.parquet")
    r.add_argument("--txt-docs", choices=shards.TXT_DOCS, default="paragraph",
                   help=".txt documents: paragraph (split on blank lines), file, or line")
    r.add_argument("--overwrite", action="store_true", help="delete .parquet files already in --out first")
    r.add_argument("--base-dir", default=None, help="base directory (default $RAYCHAT_BASE_DIR or ~/.cache/raychat)")
    r.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")

    args = p.parse_args(argv)
    if args.command == "download":
        if args.workers < 1:
            p.error(f"--workers={args.workers} must be >= 1")
        if args.num_shards == 0 or args.num_shards < -1:
            p.error(f"-n={args.num_shards}: ask for at least 1 shard, or -1 for all of them")
        args.base_url = args.base_url or shards.SOURCES[args.source].base_url
        if "{i" not in args.base_url:
            p.error(f"--base-url={args.base_url!r} needs '{{i:05d}}' where the shard index goes")
    else:
        if args.rows_per_group < 1:
            p.error(f"--rows-per-group={args.rows_per_group} must be >= 1")
        if args.shard_chars < 1:
            p.error(f"--shard-chars={args.shard_chars} must be >= 1")
        if not 0 < args.val_fraction <= 0.5:
            p.error(f"--val-fraction={args.val_fraction} must be in (0, 0.5]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "download":
        data_dir = args.data_dir or shards.default_data_dir(args.base_dir, create=not args.dry_run,
                                                            source=args.source)
        indices = shards.download_indices(args.num_shards, args.source)
        print(f"download {len(indices)} {args.source} shards (train 0..{indices[-2]} + val {indices[-1]}) with "
              f"{args.workers} workers\nfrom {args.base_url}\nto {data_dir}", flush=True)
        if args.dry_run:
            return 0
        summary = shards.download(args.num_shards, workers=args.workers, data_dir=data_dir, base_url=args.base_url,
                                  source=args.source)
        return 1 if summary.failed else 0

    out = args.out or shards.default_data_dir(args.base_dir, create=not args.dry_run)
    print(f"prepare from {args.source} to {out}: rows_per_group={args.rows_per_group} "
          f"shard_chars={args.shard_chars:,} val_fraction={args.val_fraction} txt_docs={args.txt_docs} "
          f"overwrite={args.overwrite}", flush=True)
    if args.dry_run:
        return 0
    s = shards.prepare(args.source, out, rows_per_group=args.rows_per_group, shard_chars=args.shard_chars,
                       val_fraction=args.val_fraction, txt_docs=args.txt_docs, overwrite=args.overwrite)
    print(f"Done! {len(s.train_files)} train shards ({s.train_docs:,} docs, {s.train_chars:,} chars) + val.parquet "
          f"({s.val_docs:,} docs, {s.val_chars:,} chars) from {s.source_files} files; dropped {s.dropped_empty} "
          f"empty docs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
