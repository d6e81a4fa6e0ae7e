#!/usr/bin/env bash
# The GPU checks in one run, sized for the 15 minutes of device time a lent GPU machine gives (its start
# included), in order of what matters most:
#   env         torch / CUDA / NCCL, the GPU and the peak FLOPs raychat's MFU uses, each side's attention path,
#               the loop, model and optimizer imported without Ray
#   mfu         raychat's loop beside nanochat 07c4dd4's own base_train at the reference's d12 (T 2048, B 32,
#               SSSL, vocab 32768): tok/s, MFU, peak memory, recompiles (bench/bench_gpu.py)
#   tests       the CUDA tests: compile of model and optimizer, NCCL bound to its GPU, checkpoint staging and
#               dtypes, FlexAttention/FA3 against references, the NaN check, FP8 matmuls and an FP8 run, and a
#               run end to end (eval, samples, saves, a resume from step 4, eager steps)
#   fp8         --recipe 2026-07 at d12: bf16 against --fp8 tensorwise (GPU_CHECK_FP8_PEER=1: nanochat 92d63d4's
#               bf16 and --fp8 beside them)
#   fit         d20 at B 32, T 2048: peak memory against an 80 GB H100
#   checkpoint  the step loop's pause for a d20 checkpoint (not in the default list)
#
#   bash scripts/gpu_check.sh prepare                    # here, in the project's venv: writes .gpu/ (bench
#                                                        # shards of FineWeb-sized documents, a 32768-token
#                                                        # tokenizer, copies of the peers nanochat 07c4dd4 and
#                                                        # 92d63d4 and their two missing imports; the GPU
#                                                        # machine reaches no network: 17 MB), which the run
#                                                        # carries
#   bash scripts/gpu_check.sh run [OUT_DIR]              # on the GPU machine, .gpu/ beside the code; OUT_DIR
#                                                        # defaults to $OUT
#   bash scripts/gpu_check.sh run --device-type cpu DIR  # every step here, small and on the CPU: a rehearsal
#
# Each step streams its output into OUT_DIR/<step>.txt as it runs, under a time limit of its own, so a run cut
# short still returns what it did. GPU_CHECK_PARTS picks steps (default: env mfu tests, in that order). The
# limits come from the first H200 run (2026-12-04): env 16 s; mfu ~245 s (each side's step 0 compiles for
# 70-90 s); tests ~190 s; fp8 ~230 s; fit ~130 s. The default fits one 10-minute call (505 s by the limits);
# GPU_CHECK_PARTS="fp8 fit" is a second call of up to 400 s, which a 15-minute lease has room for only in
# part (GPU_CHECK_PARTS=fp8 alone: 250 s).
# `run` needs torch, pyarrow, tiktoken, numpy, pyyaml and pytest, and no Ray: the MFU runs are bench_train's
# `local` loop, whose step code is the same under Ray.
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
  [[ " ${GPU_CHECK_PARTS:-env mfu tests} " == *" $1 "* ]]
}

case "${1:-}" in
  prepare)
    "$PY" -c "from bench.bench_train import prepare_bench_data; print(prepare_bench_data('$CACHE', $VOCAB))"
    "$PY" -c "from bench.bench_gpu import long_doc_shards; print(long_doc_shards('$CACHE'))"
    # The peer, copied from where this workspace keeps it (bench.peers), and the two imports of its base_train
    # that the GPU image lacks: rustbpe (its wheel for the image's Python 3.12, unpacked) and wandb (never
    # called with --run=dummy: an empty stand-in).
    "$PY" - "$CACHE" <<'PYEOF'
import os, shutil, subprocess, sys, tempfile, zipfile
from bench import peers
cache = sys.argv[1]
for commit in ("07c4dd4", "92d63d4"):  # the seed's reference, and the 2026-07 recipe's (the FP8 part)
    src = peers.default_dir(commit)
    if (why := peers.problem(src, os.path.join("scripts", "base_train.py"), commit=commit)):
        sys.exit(f"gpu_check: {why}")
    dst = os.path.join(cache, f"nanochat-{commit}")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "__pycache__"))
stub, site = os.path.join(cache, "peer_site"), os.path.join(cache, "site")
for d in (stub, site):
    shutil.rmtree(d, ignore_errors=True)
os.makedirs(os.path.join(stub, "wandb"))
with open(os.path.join(stub, "wandb", "__init__.py"), "w") as f:
    f.write('"""A stand-in: nanochat imports wandb, and with --run=dummy never calls it."""\n')
with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", tmp, "rustbpe==0.1.0"], check=True)
    for wheel in os.listdir(tmp):
        zipfile.ZipFile(os.path.join(tmp, wheel)).extractall(site)
print(f"peers: {cache}/nanochat-07c4dd4, -92d63d4; wandb's stand-in: {stub}; rustbpe for Python 3.12: {site}")
PYEOF
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
    for f in "$CACHE/data/val.parquet" "$CACHE/data_long/val.parquet" "$CACHE/tokenizer_$VOCAB/tokenizer.pkl" \
      "$CACHE/nanochat-07c4dd4/scripts/base_train.py" "$CACHE/peer_site/wandb/__init__.py" "$CACHE/site/rustbpe"; do
      [[ -e "$f" ]] || die "$f is missing: run 'bash scripts/gpu_check.sh prepare' here and carry $CACHE"
    done
    "$PY" -c "import numpy, pyarrow, pytest, tiktoken, torch, yaml" 2>/dev/null \
      || die "python lacks one of numpy, pyarrow, pytest, tiktoken, torch, pyyaml (carry them as wheels)"
    if [[ "$device" == cuda ]]; then
      "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
        || die "torch sees no CUDA GPU here (rehearse with --device-type cpu)"
      # The reference's d12: T 2048, B 32, 2^19 tokens a step; d20 for the fit.
      gpu=(--device-type cuda)
      ckpt=(--depths 20 --loop-seq-len 2048 --scratch "${TMPDIR:-/tmp}")
      limits=(25 270 210 250 150 150)  # from the H200 run of 2026-12-04 (docs/BENCHMARKS.md)
    else
      # The same runs, tiny: nanochat on the CPU in its own fp32 and raychat's loop; FP8 needs a GPU.
      gpu=(--device-type cpu --depth 2 --fit-depth 2 --max-seq-len 256 --device-batch-size 2 --total-batch-size 1024
        --steps 14)
      ckpt=(--depths 2 --loop-seq-len 256 --threads 1 --scratch "${TMPDIR:-/tmp}")
      limits=(60 300 300 300 300 300)
    fi
    status=0
    if wanted env; then
      step env "${limits[0]}" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
--format=csv || true; $PY - $device $CACHE <<'PYEOF'
import os, subprocess, sys
import torch
device, cache = sys.argv[1:3]
cuda = device == 'cuda'
print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| NCCL',
      '.'.join(map(str, torch.cuda.nccl.version())) if cuda else '-', '| python', sys.version.split()[0])
import raychat.loop, raychat.model, raychat.optim  # noqa: E401
assert 'ray' not in sys.modules, 'the loop, model or optimizer imported Ray'
print('raychat loop, model and optimizer imported without Ray')
from raychat.attention import attention_path
from raychat.device import get_peak_flops
from raychat.model import GPTConfig, window_sizes
name = torch.cuda.get_device_name() if cuda else 'cpu'
print('device:', name, '| capability', torch.cuda.get_device_capability() if cuda else '-',
      '| peak FLOPs raychat uses for MFU:', get_peak_flops(name) if cuda else 'inf (CPU)')
sizes = window_sizes(GPTConfig(sequence_len=2048, n_layer=12, window_pattern='SSSL'))
print('raychat attention at d12 SSSL, T 2048:', attention_path(sizes, 2048, device))
peer = subprocess.run([sys.executable, '-c', 'from nanochat.flash_attention import HAS_FA3; print(HAS_FA3)'],
                      cwd=os.path.join(cache, 'nanochat-07c4dd4'), env=dict(os.environ, PYTHONPATH='.'),
                      capture_output=True, text=True)
fa3 = peer.stdout.strip()
print('nanochat 07c4dd4 attention:', 'FA3' if fa3 == 'True' else
      'SDPA (sliding windows as full-context SDPA with a T x T mask)' if fa3 == 'False' else peer.stderr[-500:])
PYEOF"
    fi
    if wanted mfu; then
      step mfu "${limits[1]}" "$PY" -m bench.bench_gpu --parts mfu "${gpu[@]}" --cache-dir "$CACHE"
    fi
    if wanted tests; then
      # Only what needs the GPU: test_cuda's CUDA cases, the CUDA/Flex/FA3 attention tests and the paths that
      # choose them, the bf16 dataflow check.
      if [[ "$device" == cuda ]]; then  # the tokenizer fixtures train with rustbpe, which the GPU image lacks
        export PYTHONPATH="$PYTHONPATH:$PWD/$CACHE/site"
      fi
      # -o addopts=: the GPU image has no pytest-xdist, and one process suits one GPU.
      step tests "${limits[2]}" "$PY" -m pytest -o addopts= -q -rs --durations=12 -p no:cacheprovider tests/test_cuda.py \
        tests/test_attention.py tests/test_model.py \
        -k "(test_cuda and not cpu) or (test_attention and (cuda or fa3 or flex or override or attention_path)) \
or (test_model and cuda)"
    fi
    if wanted fp8 && [[ "$device" == cuda ]]; then
      # rowwise is checked by the tests; the timing is tensorwise's, the reference's recipe. GPU_CHECK_FP8_PEER=1
      # adds nanochat 92d63d4's bf16 and FP8 runs (about twice the time: give it a call of its own).
      peer=()
      if [[ -n "${GPU_CHECK_FP8_PEER:-}" ]]; then
        peer=(--fp8-peer)
        limits[3]=500
      fi
      step fp8 "${limits[3]}" "$PY" -m bench.bench_gpu --parts fp8 --fp8-recipes tensorwise "${peer[@]}" \
        "${gpu[@]}" --cache-dir "$CACHE"
    fi
    if wanted fit; then
      step fit "${limits[4]}" "$PY" -m bench.bench_gpu --parts fit "${gpu[@]}" --cache-dir "$CACHE"
    fi
    if wanted checkpoint; then
      step checkpoint "${limits[5]}" "$PY" -m bench.bench_checkpoint --device "$device" --parts loop "${ckpt[@]}"
    fi
    echo "gpu_check: done (status $status); outputs in $out"
    exit "$status"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh prepare | run [--device-type cuda|cpu] [OUT_DIR]" >&2
    exit 2
    ;;
esac
