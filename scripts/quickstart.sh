#!/usr/bin/env bash
# raychat end to end on one machine, offline, in about 10 minutes on 2 CPU cores:
#   1. shards from a corpus every machine has (the .py sources of Python's standard library)
#   2. a BPE tokenizer trained on them
#   3. a small GPT (d4) trained by 2 Ray Train workers on a local Ray that raychat starts itself
#      (with no core to spare for Ray Data here, they tokenize inline: --data-backend auto), checkpoints every 100 steps
#   4. evaluation (bits per byte on train/val) and samples
# Everything lands under $RAYCHAT_BASE_DIR/quickstart (default ~/.cache/raychat/quickstart).
#   bash scripts/quickstart.sh            # STEPS=200 by default; rerunning with the same RUN_NAME resumes
#   bash scripts/quickstart.sh --dry-run  # every step checks its flags (training: also its data), then exits
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=--dry-run ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "quickstart.sh: unknown argument '$arg' (only --dry-run and --help)" >&2; exit 2 ;;
    esac
done

export OMP_NUM_THREADS=1
unset RAY_ADDRESS  # always the embedded local Ray, never a cluster this shell points at
BASE="${RAYCHAT_BASE_DIR:-$HOME/.cache/raychat}/quickstart"
STEPS="${STEPS:-200}"
RUN_NAME="${RUN_NAME:-quickstart-d4-$(date +%Y%m%d-%H%M%S)}"
echo "quickstart: base dir $BASE, run $RUN_NAME, $STEPS steps"

if [ -n "$DRY" ] || [ ! -f "$BASE/base_data/val.parquet" ]; then
    python -m raychat.data prepare --from stdlib --out "$BASE/base_data" --base-dir "$BASE" --overwrite \
        --rows-per-group=64 --val-fraction=0.05 ${DRY:+"$DRY"}
fi
if [ -n "$DRY" ] || [ ! -f "$BASE/tokenizer/tokenizer.pkl" ]; then
    python -m scripts.tok_train --base-dir "$BASE" --data-dir "$BASE/base_data" \
        --vocab-size=4096 --max-chars=20000000 ${DRY:+"$DRY"}
fi
if [ -n "$DRY" ] && { [ ! -f "$BASE/base_data/val.parquet" ] || [ ! -f "$BASE/tokenizer/tokenizer.pkl" ]; }; then
    # A training dry run checks the real shards and tokenizer, which only a real run of the steps above makes.
    echo "quickstart: (dry run) training not checked: it needs the shards and tokenizer the steps above make"
else
    # --compile=false: a first run compiles cold in both workers at once (~100 s each on 2 cores), more than
    # 200 d4 steps win back; a longer run, or a rerun with a warm cache, gains from the default (docs/LOG.md).
    python -m raychat.train --base-dir "$BASE" --run-name "$RUN_NAME" \
        --depth=4 --head-dim=64 --max-seq-len=256 --window-pattern=L \
        --device-batch-size=8 --total-batch-size=4096 --num-workers=2 \
        --num-iterations="$STEPS" --eval-every=100 --eval-tokens=65536 --save-every=100 \
        --core-metric-every=-1 --sample-every="$STEPS" --compile=false ${DRY:+"$DRY"}
fi
# The eval and export commands for this run name its base dir: the defaults (~/.cache/raychat) hold no such run.
EVAL=(python -m raychat.eval --base-dir "$BASE" --run-name "$RUN_NAME" "--eval=bpb,sample" --split-tokens=65536 --device-batch-size=8)
EXPORT=(python -m raychat.export --base-dir "$BASE" --run-name "$RUN_NAME" --to-nanochat "$BASE/nanochat/$RUN_NAME")
"${EVAL[@]}" ${DRY:+"$DRY"}
[ -n "$DRY" ] && { echo "quickstart: dry run done"; exit 0; }
echo "quickstart: done. Report: $BASE/runs/$RUN_NAME/report.md"
echo "Evaluate it again:       ${EVAL[*]}"
echo "Export it for nanochat:  ${EXPORT[*]}"
