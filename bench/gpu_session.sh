#!/usr/bin/env bash
# Every GPU measurement still owed, in one device call (about 9 minutes on an H100/H200; each step
# has its own time limit, so a slow step costs only itself). Results go to $OUT (the device
# tool's return folder) or bench/out; copy the numbers into bench/RESULTS.md.
#
#   bash bench/gpu_session.sh            # run from the repository root
set -u
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

step() {  # step NAME SECONDS COMMAND...: output in $OUT/NAME.txt, a line in $OUT/summary.txt
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s: $*" >>"$OUT/summary.txt"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())" >"$OUT/versions.txt" 2>&1
# 1. Attention kernels (ANCHORS.md's table) and the pallas_gpu settings sweep.
step attention 200 python bench/attention_speed.py --sweep
step attention_masked 60 python bench/attention_speed.py --shapes=4x256 --key_mask --iters=3 --backends=cudnn,pallas_gpu
# 2. The training step with the two fast backends (issue 6: pallas_gpu no slower than cuDNN) and
#    the throughput target (issue 5: >= 70 img/s on an H200 within 80 GB).
step train_cudnn 110 python bench/train_speed.py --batch=32 --remat=dots --attention=cudnn --steps=5
step train_pallas 110 python bench/train_speed.py --batch=32 --remat=dots --attention=pallas_gpu --steps=5
# 3. Sampling (issue 3: <= 0.8 s/image on an H200).
step sample 110 python bench/sample_speed.py --attention=cudnn
cat "$OUT/summary.txt"
