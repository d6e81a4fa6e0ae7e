#!/usr/bin/env bash
# The GPU checks in one run, sized for the 15 minutes of device time a lent GPU machine gives (its start
# included): the CUDA tests (torch.compile of model and optimizer, an NCCL group bound to its GPU, bf16,
# FlexAttention and FA3, checkpoint staging into page-locked memory, checkpoint dtypes across devices, the
# NaN check that does not wait before the update), MFU at the reference's d12 configuration, and the
# step-loop pause for a d20 checkpoint.
#
#   bash scripts/gpu_check.sh prepare                    # here, in the project's venv: writes .gpu/ (bench
#                                                        # shards and a 32768-token tokenizer; the GPU machine
#                                                        # reaches no network), which the run carries
#   bash scripts/gpu_check.sh run [OUT_DIR]              # on the GPU machine, .gpu/ beside the code; OUT_DIR
#                                                        # defaults to $OUT (about 6-8 min estimated on an H100)
#   bash scripts/gpu_check.sh run --device-type cpu DIR  # every step here, small and on the CPU: a rehearsal
#
# Each step streams its output into OUT_DIR/<step>.txt as it runs (5 files in all), under a time limit of its
# own, so a run cut short still returns what it did. GPU_CHECK_PARTS picks steps (default: all, in the order
# below). `run` needs torch, pyarrow, tiktoken, numpy, pyyaml and pytest, and no Ray: the MFU run is
# bench_train's `local` loop, whose step code is the same under Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.gpu
VOCAB=32768
PY="${PYTHON:-python3}"  # the GPU machine's image has python3, not python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# raychat sets the reference's allocator setting itself (raychat.device); the benchmarks that allocate on
# the GPU directly get it here. A user's setting, under either name, wins.
if [[ -z "${PYTORCH_ALLOC_CONF:-}${PYTORCH_CUDA_ALLOC_CONF:-}" ]]; then
  export PYTORCH_ALLOC_CONF=expandable_segments:True
fi

die() {
  echo "gpu_check: $*" >&2
  exit 2
}

# step NAME SECONDS CMD...: run CMD for at most SECONDS, its output on the terminal and in $out/NAME.txt.
step() {
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.txt" || rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$out/$name.txt"
  if [[ $rc -ne 0 ]]; then
    status=1
  fi
}

wanted() {
  [[ " ${GPU_CHECK_PARTS:-env mfu tests checkpoint} " == *" $1 "* ]]
}

case "${1:-}" in
  prepare)
    "$PY" -c "from bench.bench_train import prepare_bench_data; print(prepare_bench_data('$CACHE', $VOCAB))"
    du -sh "$CACHE"
    ;;
  run)
    shift
    device=cuda
    if [[ "${1:-}" == "--device-type" ]]; then
      device="${2:?--device-type needs cuda or cpu}"
      shift 2
    fi
    [[ "$device" == cuda || "$device" == cpu ]] || die "--device-type $device: cuda or cpu"
    out="${1:-${OUT:-}}"
    [[ -n "$out" ]] || die "no output directory: pass OUT_DIR or set OUT"
    mkdir -p "$out"
    # Stop before any step when an input is missing: the GPU minutes are for measuring.
    for f in "$CACHE/data/val.parquet" "$CACHE/tokenizer_$VOCAB/tokenizer.pkl"; do
      [[ -f "$f" ]] || die "$f is missing: run 'bash scripts/gpu_check.sh prepare' here and carry $CACHE"
    done
    "$PY" -c "import numpy, pyarrow, pytest, tiktoken, torch, yaml" 2>/dev/null \
      || die "python lacks one of numpy, pyarrow, pytest, tiktoken, torch, pyyaml (carry them as wheels)"
    if [[ "$device" == cuda ]]; then
      "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
        || die "torch sees no CUDA GPU here (rehearse with --device-type cpu)"
      # The reference's d12: T 2048, B 32, 2^19 tokens a step, the SSSL window pattern; compiled.
      mfu=(--depth 12 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 524288 --steps 30)
      ckpt=(--depths 20 --loop-seq-len 2048 --scratch "${TMPDIR:-/tmp}")
      limits=(240 300 150)
    else
      mfu=(--depth 2 --max-seq-len 256 --device-batch-size 2 --total-batch-size 1024 --steps 14)
      ckpt=(--depths 2 --loop-seq-len 256 --threads 1 --scratch "${TMPDIR:-/tmp}")
      limits=(300 300 300)
    fi
    status=0
    if wanted env; then
      step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; \
$PY -c \"import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')\""
    fi
    if wanted mfu; then
      step mfu "${limits[0]}" "$PY" -m bench.bench_train --device-type "$device" "${mfu[@]}" --vocab-size "$VOCAB" \
        --window-pattern SSSL --repeats 1 --kinds local --stall-batches 0 --cache-dir "$CACHE"
    fi
    if wanted tests; then
      # Only what needs the GPU: test_cuda's CUDA cases, the CUDA/Flex/FA3 attention tests and the paths that
      # choose them, the bf16 dataflow check.
      step tests "${limits[1]}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_attention.py \
        tests/test_model.py -k "(test_cuda and not cpu) or (test_attention and (cuda or fa3 or flex or override \
or attention_path)) or (test_model and cuda)"
    fi
    if wanted checkpoint; then
      step checkpoint "${limits[2]}" "$PY" -m bench.bench_checkpoint --device "$device" --parts loop "${ckpt[@]}"
    fi
    echo "gpu_check: done (status $status); outputs in $out"
    exit "$status"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare | run [--device-type cuda|cpu] [OUT_DIR]" >&2
    exit 2
    ;;
esac
