#!/usr/bin/env bash
# The GPU checks in one run, sized for the few minutes a lent GPU machine gives (see docs/BENCHMARKS.md):
# the CUDA tests (torch.compile of model and optimizer, NCCL, bf16, FA3 on Hopper, checkpoint staging from
# the GPU), MFU at the reference's d12 configuration, and the step-loop pause for a d20 checkpoint.
#
#   bash scripts/gpu_check.sh prepare          # here, in the project's venv: writes .gpu/ (bench data and a
#                                              # 32768-token tokenizer; the GPU machine may have no internet)
#   bash scripts/gpu_check.sh run [OUT_DIR]    # on the GPU machine, with .gpu/ beside the code (about 6 min
#                                              # estimated on an H100; not yet run on one)
#
# `run` needs torch (CUDA), pyarrow, tiktoken, numpy, pyyaml, pytest and this checkout on the Python path: no Ray,
# as the MFU run is bench_train's `local` loop: the step's code is the same under Ray, whose processes only
# compete for CPU cores (docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.gpu
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

case "${1:-}" in
  prepare)
    python -c "from bench.bench_train import prepare_bench_data; print(prepare_bench_data('$CACHE', 32768))"
    du -sh "$CACHE"
    ;;
  run)
    out="${2:-${OUT:-gpu_check_out}}"
    mkdir -p "$out"
    status=0
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
      python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
    } 2>&1 | tee "$out/env.txt"
    # The issue's target first: each part writes its file as it goes, so a run cut short still returns them.
    python -m bench.bench_train --device-type cuda --depth 12 --max-seq-len 2048 --device-batch-size 32 \
      --total-batch-size 524288 --vocab-size 32768 --window-pattern SSSL --steps 30 --repeats 1 --kinds local \
      --stall-batches 0 --cache-dir "$CACHE" 2>&1 | tee "$out/mfu_d12.txt" || status=1
    python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_attention.py \
      tests/test_model.py::test_cuda_bf16_dataflow 2>&1 | tee "$out/tests.txt" || status=1
    python -m bench.bench_checkpoint --device cuda --depths 20 --parts loop --loop-seq-len 2048 \
      --scratch "${TMPDIR:-/tmp}" 2>&1 | tee "$out/checkpoint_cuda.txt" || status=1
    exit "$status"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare | run [OUT_DIR]" >&2
    exit 2
    ;;
esac
