#!/usr/bin/env bash
# nanochat's speedrun (runs/speedrun.sh) on a Ray cluster, step for step, through `ray job submit`:
#   shards to the bucket -> tokenizer -> (rest of the shards) -> d24 to GPT-2 CORE on 8xH100 -> evaluation.
# Base-model stage only: the reference's SFT, chat eval and tok_eval steps have no raychat counterpart.
#
# Prerequisites (docs/CLUSTER.md): `ray up cluster.yaml`, then in another terminal
# `ray dashboard cluster.yaml` (the SSH tunnel to the job API on 127.0.0.1:8265). Then:
#
#   BUCKET_URI=s3://my-bucket/raychat WANDB_RUN=speedrun bash scripts/speedrun.sh
#   RECIPE=2026-07 BUCKET_URI=... bash scripts/speedrun.sh   # nanochat 92d63d4's recipe on ClimbMix (ratio 8)
#   bash scripts/speedrun.sh --dry-run      # print the resolved settings and every command, submit nothing
#
# Rerunning the script with the same RUN_NAME resumes the training run from its last checkpoint in the
# bucket (finished steps are not redone; downloads skip shards already present).
set -euo pipefail
cd "$(dirname "$0")/.."    # --working-dir . ships the repository root

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "speedrun.sh: unknown argument '$arg' (only --dry-run and --help are accepted;" \
                "settings come from environment variables, see the top of this file)" >&2; exit 2 ;;
    esac
done

# ---- settings (environment variables) --------------------------------------------------------------
if [[ -z "${BUCKET_URI:-}" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
        BUCKET_URI="s3://CHANGE_ME_BUCKET/raychat"
    else
        echo "speedrun.sh: set BUCKET_URI to the shared storage for shards and checkpoints," \
             "e.g. BUCKET_URI=s3://my-bucket/raychat or gs://my-bucket/raychat" >&2
        exit 2
    fi
fi
case "$BUCKET_URI" in
    s3://*|gs://*) ;;
    *) echo "speedrun.sh: BUCKET_URI='$BUCKET_URI' must start with s3:// or gs://: every node of a" \
            "multi-node cluster reads shards and checkpoints from it (a node's local disk is not shared)" >&2; exit 2 ;;
esac
BUCKET_URI="${BUCKET_URI%/}"
RECIPE="${RECIPE:-seed}"                      # seed (nanochat 07c4dd4) or 2026-07 (nanochat 92d63d4)
case "$RECIPE" in
    # nanochat's leaderboard runs: run 1 (d24, ratio 12, FineWeb-Edu) and run 6 (d24, ratio 8, ClimbMix, FP8)
    seed) SOURCE=fineweb-edu; SUBDIR=base_data; DEFAULT_SHARDS=370; RATIO=12; FP8="" ;;
    2026-07) SOURCE=climbmix; SUBDIR=base_data_climbmix; DEFAULT_SHARDS=170; RATIO=8; FP8="--fp8" ;;
    *) echo "speedrun.sh: RECIPE='$RECIPE' must be seed or 2026-07" >&2; exit 2 ;;
esac
RUN_NAME="${RUN_NAME:-speedrun-d24}"          # the training run's identity: the same name resumes it
WANDB_RUN="${WANDB_RUN:-dummy}"               # 'dummy' disables wandb, as in the reference
NUM_SHARDS="${NUM_SHARDS:-$DEFAULT_SHARDS}"   # as the reference downloads: ~10B tokens (seed), 170 ClimbMix shards
RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
DATA_DIR="$BUCKET_URI/$SUBDIR"
STORAGE="$BUCKET_URI/runs"
STAMP="$(date +%Y%m%d-%H%M%S)"                # submission ids must be unique per cluster
export RAY_ADDRESS
export RAY_AUTH_MODE=token                    # the cluster runs with token auth; the token is ~/.ray/auth_token

# The runtime environment every job gets. WANDB_API_KEY travels from your shell to the job here and is
# never written into a file of this repository (token holders can still read it in the job's details).
# `runtime_env_json mask` prints the same JSON with the key hidden, for --dry-run output.
runtime_env_json() {
    python3 -c 'import json, os, sys
env = {"OMP_NUM_THREADS": "1"}
if os.environ.get("WANDB_API_KEY"):
    env["WANDB_API_KEY"] = "***" if sys.argv[1:] == ["mask"] else os.environ["WANDB_API_KEY"]
print(json.dumps({"env_vars": env}))' "$@"
}

echo "speedrun on Ray: RAY_ADDRESS=$RAY_ADDRESS RUN_NAME=$RUN_NAME WANDB_RUN=$WANDB_RUN RECIPE=$RECIPE"
echo "  shards      -> $DATA_DIR ($NUM_SHARDS)"
echo "  checkpoints -> $STORAGE/$RUN_NAME"
echo "  wandb key   -> $([[ -n "${WANDB_API_KEY:-}" ]] && echo "from \$WANDB_API_KEY" || echo 'not set')"

# submit ID [ray job submit options...] -- ENTRYPOINT...: blocks, streams the logs, fails when the job fails.
submit() {
    local id="$1"; shift
    local head=(ray job submit --submission-id "$id-$STAMP" --working-dir .)
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "${head[@]}" --runtime-env-json "$(runtime_env_json mask)" "$@"; echo
    else
        "${head[@]}" --runtime-env-json "$(runtime_env_json)" "$@"
    fi
}

# wait_job ID: follow a --no-wait job to its end and fail unless it succeeded.
wait_job() {
    local id="$1-$STAMP"
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "ray job logs --follow $id && ray job status $id  # must say SUCCEEDED"
        return 0
    fi
    ray job logs --follow "$id" > /dev/null
    if ! ray job status "$id" | grep -q SUCCEEDED; then
        echo "speedrun.sh: job $id did not succeed; see 'ray job logs $id'" >&2
        exit 1
    fi
}

# 1. ~2B characters for the tokenizer: 8 shards (+ the val shard) straight into the bucket. Runs on the
#    head (a job driver reserves no CPU by default), so no GPU node is started for it.
submit data-8 -- python -m raychat.data download -n 8 --source "$SOURCE" --data-dir "$DATA_DIR"

# 2. The rest of the shards in the background, as the reference does while its tokenizer trains.
submit data-all --no-wait -- python -m raychat.data download -n "$NUM_SHARDS" --source "$SOURCE" --data-dir "$DATA_DIR"

# 3. Tokenizer, with the reference's defaults (vocab 32768, 2B chars, doc cap 10000). The head advertises
#    no CPUs, so --entrypoint-num-cpus puts this job on the GPU node (started by the autoscaler): the
#    tokenizer lands in RAYCHAT_BASE_DIR on the node that then trains, as on the reference's single node.
submit tokenizer --entrypoint-num-cpus=8 -- python -m scripts.tok_train --data-dir "$DATA_DIR"

# 4. Wait for the download.
wait_job data-all

# 5. d24 to GPT-2 CORE: the reference's training step with the batch size that fits 80 GB (b19b4f3: 16 rows, grad
#    accum 2). raychat additions: one Ray Train worker per GPU, checkpoints to the bucket every 1000 steps
#    (the reference saves only at the end) so a lost node costs minutes, and automatic retries.
submit train --entrypoint-num-cpus=1 -- python -m raychat.train \
    --run="$WANDB_RUN" --recipe="$RECIPE" --depth=24 --target-param-data-ratio="$RATIO" --device-batch-size=16 $FP8 \
    --num-workers=8 --use-gpu=true --cpus-per-worker=16 \
    --run-name="$RUN_NAME" --storage-path="$STORAGE" --data-dir="$DATA_DIR" \
    --save-every=1000 --keep-checkpoints=2 --max-failures=3

# 6. Evaluate the final checkpoint (CORE and bpb, docs/REFERENCE.md §9), like the reference's base_eval.
submit eval --entrypoint-num-cpus=1 -- python -m raychat.eval --run-name="$RUN_NAME" --storage-path="$STORAGE"

echo "speedrun done: checkpoints and results under $STORAGE/$RUN_NAME"
