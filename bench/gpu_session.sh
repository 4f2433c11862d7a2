#!/usr/bin/env bash
# Every GPU measurement still owed, in one run that ends within BUDGET seconds (default 520, for a
# GPU lent for a short slot: run it under a limit of ~540 s). The steps run most valuable first;
# each gets the smaller of its own limit and the time left, so a slow or failing step costs only
# itself and a late step is skipped, not half-run. The limits are the first H200 session's step
# times (2026-12-04, bench/gpu_runs/2026-12-04-h200/summary.txt) plus a margin.
#
#   bash bench/gpu_session.sh                    # on the GPU machine, from the repository root
#   DRY_RUN=1 OUT=/tmp/dry bash bench/gpu_session.sh   # on a CPU: tiny sizes, checks the script
#
# The plan after that session: the timings again with no profile in the same process (a profile is a
# step of its own), the training step again with XLA's matmuls on cuBLAS (train_cublas: the
# sampler's GPU default since it ran 5.5% faster so; the product's training keeps XLA's default
# until this step's number says otherwise), the profiles with XLA's command buffers off (on, 54% of
# a training step and 98% of a stage-3 forward were one command_buffer_N op each, the kernels inside
# unnamed), cuDNN on heads zero-padded to 80, 96 and 128 columns (its forward bounds sampling: 278
# TFLOP/s at B8x4096 against FA2's 384), and a tile sweep around our kernel's defaults, which beat
# all nine settings of the first sweep. No longer run: the bundled Pallas mha (75 TFLOP/s
# forward+backward at B8x4096), the masked 4x256 text attention, sampling with XLA's GEMMs on cuBLAS
# as a step of its own (the sampler's GPU default since: the sample step times it), and the training
# step with pallas_gpu (until a sweep changes the kernel's settings; a resume-exactness check runs
# instead).
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
  # cudnn and compiled Pallas need a GPU: a padded cuDNN backend is there to be reported as an error row
  BACKENDS=xla,pallas_gpu,cudnn_pad96 FAST=xla
  TRAIN=(--preset=tiny --batch=8 --steps=2)  # no remat: tests/test_remat.py checks the policies
  SAMPLE=(--preset=tiny --batch=4 --steps=3 --repeats=1)
  RESUME=(--preset=tiny --batch=4 --steps=2)
else
  ATTENTION=(--iters=10) SHAPES=8x4096,32x1024,128x256 SWEEP=(--sweep)
  SWEEP_SHAPES=8x4096,32x1024  # where tiles matter most
  BACKENDS=xla,cudnn,pallas_gpu,cudnn_pad80,cudnn_pad96,cudnn_pad128 FAST=cudnn
  # Batch 48 with remat=dots_attention: XLA's memory plan for it is 71-72 GB of an H200 under jax 0.10.2
  # and 0.11.2 (bench/gpu_compile.py), the largest batch planned within the 80 GB target; 70.3 GB at
  # run time on 2026-12-04.
  TRAIN=(--batch=48 --remat=dots_attention --steps=5)
  SAMPLE=(--repeats=2)
  RESUME=(--steps=6)  # XL/4's blocks at depth 4, batch 8 (its defaults), resumed at step 3
fi
# An empty list of command types turns XLA's command buffers (CUDA graphs) off, so that the profiler
# sees each kernel (jax compiles its own profiling runs for PGLE the same way). A program compiled so
# may run slower: the profile steps time nothing.
PROFILE_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer="

step env 20 bash -c "nvidia-smi; $PY -c 'import jax, flax; print(jax.__version__, flax.__version__, jax.devices())'"
# 1. The kernels beside cuDNN, and cuDNN on heads padded to 80, 96, 128 columns (flops counted on
#    the 72 real ones; 2026-12-04: 52 s for 4 backends).
step attention 110 $PY bench/attention_speed.py --backends=$BACKENDS --shapes=$SHAPES "${ATTENTION[@]}"
# 2. Training throughput (target >= 70 img/s on an H200 within 80 GB; 2026-12-04: 58.1 img/s).
#    A dry run times its step in step 6 (a CPU compiles it for ~50 s, the same program twice).
#    train_cublas: the same step with XLA's matmuls on cuBLAS, not its Triton GEMMs (sampling ran 5.5% faster
#    so; by FLOP counts the step's matmuls ran ~353 TFLOP/s, a lone 8192^3 bf16 matmul 517 in jax, 775 in torch).
#    A dry run skips both: on a CPU the flag changes nothing, and train_profile times the same tiny step.
if [ "$DRY_RUN" != 1 ]; then
  step train_fast 85 $PY bench/train_speed.py --attention=$FAST "${TRAIN[@]}"
  step train_cublas 85 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
    $PY bench/train_speed.py --attention=$FAST "${TRAIN[@]}"
else
  for name in train_fast train_cublas; do
    echo "$name skipped: a dry run (train_profile times the same step, and profiles it)" >>"$OUT/summary.txt"
  done
fi
# 3. Sampling (target <= 0.8 s/image; 2026-12-04: 0.98 on cuBLAS GEMMs, 85 s without a profile).
step sample 110 $PY bench/sample_speed.py --attention=$FAST "${SAMPLE[@]}"
# 4. The release on this card, in this call: the numbers ours stand beside (2026-12-04: 42 s).
if [ -f .release_bench/release_speed.py ] && [ "$DRY_RUN" != 1 ]; then
  step release 75 bash -c 'python3 -m pip install -q --no-index --no-deps --target /tmp/release_site .release_bench/wheels/*.whl && PYTHONPATH=/tmp/release_site RELEASE_TRAIN_BS=24 python3 .release_bench/release_speed.py'
else
  echo "release skipped: no .release_bench/ in the checkout (or a dry run)" >>"$OUT/summary.txt"
fi
# 5. Does a resumed run train bit for bit as an uninterrupted one on this GPU (the README's exact
#    resume, checked on CPUs only)? Two fresh processes, XL/4's blocks at depth 4 (seconds to compile).
#    It replaces the training step with pallas_gpu (2026-12-04: 51.3 img/s against cuDNN's 58.1): that
#    kernel's settings change only after this session's sweep, so it would time the same program again.
step resume_exactness 80 $PY bench/resume_exactness.py --attention=$FAST "${RESUME[@]}"
# 6. Where a training step's time goes: one step's top ops, command buffers off (compile ~42 s).
step train_profile 90 env XLA_FLAGS="$PROFILE_FLAGS" \
  $PY bench/train_speed.py --attention=$FAST --profile "${TRAIN[@]}" --steps=1
# 7. Where a stage-3 forward's time goes, command buffers off, no generate timed before it.
step sample_profile 60 env XLA_FLAGS="$PROFILE_FLAGS" \
  $PY bench/sample_speed.py --attention=$FAST --profile_only "${SAMPLE[@]}"
# 8. The tile sweep around our kernel's defaults with whatever time is left (the defaults were timed
#    in step 1; 2026-12-04: 67 s for 18 settings x shapes).
step sweep 300 $PY bench/attention_speed.py --backends= "${SWEEP[@]}" --shapes=$SWEEP_SHAPES "${ATTENTION[@]}"
cat "$OUT/summary.txt"
