"""`python -m raychat.export --run-name X [--step N] --to-nanochat DIR`: a raychat model in nanochat's layout.

Writes `DIR/model_{step:06d}.pt` and `DIR/meta_{step:06d}.json` (same state-dict keys, shapes and
dtypes as nanochat's GPT) and the tokenizer as `DIR/tokenizer/{tokenizer.pkl,token_bytes.pt}`, so nanochat's
own tools load the model (copy DIR to `$NANOCHAT_BASE_DIR/base_checkpoints/<tag>/` and the tokenizer to
`$NANOCHAT_BASE_DIR/tokenizer/`). The reverse direction is `python -m raychat.train --init-from-nanochat DIR`.
"""
import os
import sys

import torch

from raychat import checkpoint as ckpt_files
from raychat import runs, storage
from raychat.inputs import read_tokenizer_files
from raychat.common import cli_parser, get_base_dir


def main(argv=None) -> int:
    p = cli_parser("raychat.export", "Export a raychat checkpoint in nanochat's layout")
    p.add_argument("--run-name", required=True, help="the raychat run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--storage-path", default=None, help="where runs live (default <base>/runs)")
    p.add_argument("--to-nanochat", required=True, help="output directory")
    p.add_argument("--base-dir", default=None, help="base directory (default $RAYCHAT_BASE_DIR or ~/.cache/raychat)")
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default <base>/tokenizer)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the arguments, print what would be exported and exit (the run is looked up at launch)")
    args = p.parse_args(argv)
    if args.dry_run:
        print(f"would export run {args.run_name} step {args.step or 'newest'} to {args.to_nanochat}")
        return 0
    base = get_base_dir(args.base_dir, create=False)
    tok_dir = storage.absolute(args.tokenizer_dir) or os.path.join(base, "tokenizer")
    try:
        run_dir = runs.find_run(storage.absolute(args.storage_path) or os.path.join(base, "runs"), args.run_name)
        with runs.find_checkpoint(run_dir, args.step) as found:  # the newest intact one, or --step's
            state = torch.load(os.path.join(found.local_dir, ckpt_files.MODEL_FILE), map_location="cpu",
                               weights_only=True)
            meta = ckpt_files.read_meta(found.local_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        tokenizer_files = read_tokenizer_files(tok_dir)  # local or in a bucket
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written = ckpt_files.export_nanochat(args.to_nanochat, found.step, state, meta)
    os.makedirs(os.path.join(args.to_nanochat, "tokenizer"), exist_ok=True)
    for name, data in tokenizer_files.items():
        with open(os.path.join(args.to_nanochat, "tokenizer", name), "wb") as f:
            f.write(data)
        written.append(os.path.join(args.to_nanochat, "tokenizer", name))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
