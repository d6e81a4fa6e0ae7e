#!/usr/bin/env bash
# The laptop version of the speedrun (nanochat's runs/runcpu.sh in raychat form): a d6 model on CPU (or MPS) with a
# local Ray instance that raychat starts itself; no cluster, no bucket. The reference quotes about
# 30 minutes on a MacBook Pro M3 Max for these settings.
#
#   bash scripts/runcpu.sh               # FineWeb-Edu shards from the internet
#   DATA=stdlib bash scripts/runcpu.sh   # offline: shards made from Python's own documentation/sources
#   bash scripts/runcpu.sh --dry-run     # every step checks its flags (training: also its data), then exits
#
# Rerunning with the same RUN_NAME resumes that run (a finished run trains 0 more steps); pick a new
# RUN_NAME for a fresh run.
set -euo pipefail
# (bash 3.2, the macOS default, is enough: no empty-array expansions under set -u.)
cd "$(dirname "$0")/.."    # `python -m scripts.tok_train` imports from the repository root

DRY=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=--dry-run ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "runcpu.sh: unknown argument '$arg' (only --dry-run and --help are accepted)" >&2; exit 2 ;;
    esac
done

export OMP_NUM_THREADS=1
export RAYCHAT_BASE_DIR="${RAYCHAT_BASE_DIR:-$HOME/.cache/raychat}"
# A local run: never submit to a cluster this shell happens to point at.
unset RAY_ADDRESS
WANDB_RUN="${WANDB_RUN:-dummy}"
RUN_NAME="${RUN_NAME:-runcpu-d6}"
DATA="${DATA:-fineweb}"

echo "runcpu: RAYCHAT_BASE_DIR=$RAYCHAT_BASE_DIR RUN_NAME=$RUN_NAME WANDB_RUN=$WANDB_RUN DATA=$DATA"

# 1. Shards: 8 FineWeb-Edu shards (+ val), as the reference; or an offline corpus.
case "$DATA" in
    fineweb) python -m raychat.data download -n 8 ${DRY:+"$DRY"} ;;
    stdlib) python -m raychat.data prepare --from stdlib ${DRY:+"$DRY"} ;;
    *) echo "runcpu.sh: DATA='$DATA' must be fineweb (download) or stdlib (offline)" >&2; exit 2 ;;
esac

# 2. Tokenizer (the reference passes --max-chars=2000000000, its default).
python -m scripts.tok_train --max-chars=2000000000 ${DRY:+"$DRY"}

# 3. d6 base model: the reference script's training flags on one CPU Ray Train worker.
if [ -n "$DRY" ] && { [ ! -d "$RAYCHAT_BASE_DIR/base_data" ] || [ ! -f "$RAYCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ]; }; then
    # A training dry run checks the real shards and tokenizer, which only a real run of the steps above makes.
    echo "runcpu: (dry run) training not checked: it needs the shards and tokenizer the steps above make"
else
    python -m raychat.train \
        --depth=6 --head-dim=64 --window-pattern=L --max-seq-len=512 \
        --device-batch-size=32 --total-batch-size=16384 \
        --eval-every=100 --eval-tokens=524288 --core-metric-every=-1 --sample-every=100 \
        --num-iterations=5000 --run="$WANDB_RUN" \
        --num-workers=1 --use-gpu=false --run-name="$RUN_NAME" ${DRY:+"$DRY"}
fi

# 4. Evaluate the final checkpoint (the reference's base_eval step).
python -m raychat.eval --run-name="$RUN_NAME" ${DRY:+"$DRY"}
