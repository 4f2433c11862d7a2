#!/usr/bin/env bash
# Every GPU measurement still owed, in one run that ends within BUDGET seconds (default 520, for a
# GPU lent for a short slot: run it under a limit of ~540 s). The steps run most valuable first;
# each gets the smaller of its own limit and the time left, so a slow or failing step costs only
# itself and a late step is skipped, not half-run.
#
#   bash bench/gpu_session.sh                    # on the GPU machine, from the repository root
#   DRY_RUN=1 OUT=/tmp/dry bash bench/gpu_session.sh   # on a CPU: tiny sizes, checks the script
#
# The release's own timing script is not part of this repository. To time it in the same run, put
# its folder (code, diffusers wheel, release_speed.py) into the checkout as .release_bench/ (listed
# in .git/info/exclude, and copied to the GPU machine with the checkout).
#
# What it writes to $OUT (three files, for runners that copy back only a few):
#   summary.txt          one line per step: rc, seconds, command (rc 124: hit its limit; "skipped")
#   log.txt              every step's output (their JSON results), in order
#   release_speed.json   the release's numbers, when .release_bench was there
# Copy the numbers into bench/RESULTS.md beside the release's.
set -u
export OUT=${OUT:-bench/out}  # exported: the release's script writes release_speed.json there
BUDGET=${BUDGET:-520}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
: >"$OUT/log.txt"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
PY=${PYTHON:-python3}  # the GPU machine has python3 only

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS - 13))  # a step's limit, plus timeout's 10 s to KILL, ends in the budget
  if ((left < 15)); then
    echo "$name skipped (${left}s left of ${BUDGET}s): $*" >>"$OUT/summary.txt"
    return
  fi
  limit=$((limit * LIMIT_SCALE))
  ((limit > left)) && limit=$left
  local start=$SECONDS
  echo "===== $name (limit ${limit}s): $*" >>"$OUT/log.txt"
  # The last 2 MB of a step's output is plenty and keeps log.txt under the tool's 16 MiB per file.
  timeout -k 10 "$limit" "$@" 2>&1 | tail -c 2000000 >>"$OUT/log.txt"  # -k: KILL what ignores TERM
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - start))s: $*" >>"$OUT/summary.txt"
}

LIMIT_SCALE=1
if [ "$DRY_RUN" = 1 ]; then  # the same steps at sizes a 2-core CPU runs in a few minutes
  LIMIT_SCALE=4  # the limits are the GPU's; a busy 2-core CPU interprets the kernels far slower
  ATTENTION=(--interpret --heads=2 --iters=1) SHAPES=2x256 SWEEP_SHAPES=2x256 SWEEP=(--sweep --sweep_count=2)
  BACKENDS=xla,pallas_gpu FAST=xla PALLAS=xla  # cudnn and compiled Pallas need a GPU
  TRAIN=(--preset=tiny --batch=8 --steps=2)  # no remat: tests/test_remat.py checks the policies
  SAMPLE=(--preset=tiny --batch=4 --steps=3 --repeats=1)
else
  ATTENTION=(--iters=10) SHAPES=8x4096,32x1024,128x256 SWEEP_SHAPES=8x4096,32x1024 SWEEP=(--sweep)  # where tiles matter most
  BACKENDS=xla,cudnn,pallas_gpu,mha FAST=cudnn PALLAS=pallas_gpu
  # Batch 48 with remat=dots_attention: XLA's memory plan for it is 71-72 GB of an H200 under jax 0.10.2
  # and 0.11.2 (bench/gpu_compile.py), the largest batch planned within the 80 GB target; by the
  # projection in bench/RESULTS.md ~10% faster than remat=dots (64-67 GB), which runs every attention
  # forward again in the backward.
  TRAIN=(--batch=48 --remat=dots_attention --steps=5)
  SAMPLE=(--repeats=2)
fi

step env 20 bash -c "nvidia-smi; $PY -c 'import jax, flax; print(jax.__version__, flax.__version__, jax.devices())'"
# 1. Does our kernel compile and agree, and how fast is it beside cuDNN and the bundled mha
#    (target: pallas_gpu fwd+bwd >= 250 TFLOP/s at B8x4096)?
step attention 75 $PY bench/attention_speed.py --backends=$BACKENDS --shapes=$SHAPES "${ATTENTION[@]}"
# 2. Training throughput (target >= 70 img/s on an H200 within 80 GB) with the top ops of one step.
step train_fast 100 $PY bench/train_speed.py --attention=$FAST --profile "${TRAIN[@]}"
# 3. Sampling (target <= 0.8 s/image), with the top ops of the last stage and of a whole generate.
step sample 110 $PY bench/sample_speed.py --attention=$FAST --profile "${SAMPLE[@]}"
# 4. The release on this card, in this call: the numbers ours stand beside.
if [ -f .release_bench/release_speed.py ] && [ "$DRY_RUN" != 1 ]; then
  step release 150 bash -c 'python3 -m pip install -q --no-index --no-deps --target /tmp/release_site .release_bench/wheels/*.whl && PYTHONPATH=/tmp/release_site RELEASE_TRAIN_BS=24 python3 .release_bench/release_speed.py'
else
  echo "release skipped: no .release_bench/ in the checkout (or a dry run)" >>"$OUT/summary.txt"
fi
# 5. Our kernel in the training step (target: no slower than cuDNN). A dry run's is step 2 again: skipped.
if [ "$PALLAS" != "$FAST" ]; then
  step train_pallas 90 $PY bench/train_speed.py --attention=$PALLAS "${TRAIN[@]}"
else
  echo "train_pallas skipped: the same backend as train_fast ($FAST)" >>"$OUT/summary.txt"
fi
# 6. Sampling with XLA's GEMMs on cuBLAS instead of Triton: compiled for an H200 without one, the
#    MLP's bias and GELU then ride in the GEMM's epilogue and a stage-3 forward moves 20% fewer bytes
#    (bench/RESULTS.md); only a GPU tells whether that makes it faster.
if [ "$DRY_RUN" != 1 ]; then  # on a CPU the flag changes nothing: step 3 again
  step sample_cublas 90 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" $PY bench/sample_speed.py --attention=$FAST "${SAMPLE[@]}"
else
  echo "sample_cublas skipped: a dry run (the flag only changes a GPU's GEMMs)" >>"$OUT/summary.txt"
fi
# 7. The text path's key-masked attention, then the tile sweep with whatever time is left (its
#    default settings were timed in step 1).
step attention_masked 30 $PY bench/attention_speed.py --key_mask --backends=${BACKENDS%,mha} --shapes=4x256 "${ATTENTION[@]}"
step sweep 300 $PY bench/attention_speed.py --backends= "${SWEEP[@]}" --shapes=$SWEEP_SHAPES "${ATTENTION[@]}"
cat "$OUT/summary.txt"
