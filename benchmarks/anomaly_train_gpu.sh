#!/usr/bin/env bash
# Train the shipped flow-mismatch textures checkpoint on one GPU, evaluate it, keep the evidence.
# Fits one device call: bash benchmarks/anomaly_train_gpu.sh [TRAIN_MINUTES] [extra train flags]
#   e.g. bash benchmarks/anomaly_train_gpu.sh 5 --preset small
#        bash benchmarks/anomaly_train_gpu.sh 5 --preset paper --image-size 128   (the open
#        question of issue 9; the tiny model is worse at 128 px: benchmarks/RESULTS.md)
# Writes to $OUT (default gpu_out/): detector.pt, train_log.json, train.log, metrics.json,
# metrics.md, eval.log, overlays.tar, build.log  (8 files: the device tool's limit).
set -euo pipefail
OUT=${OUT:-gpu_out}
MINUTES=${1:-4}; shift || true
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
mkdir -p "$OUT"
nvidia-smi -L || true
# `import geokernels` needs geokernels._C; training needs no custom kernel, so the quick CPU-only
# build is enough (scoring on CUDA tensors then uses the Triton or reference mismatch backend).
if ! $PY -c "import geokernels" 2>/dev/null; then
  GEOKERNELS_NO_CUDA=1 MAX_JOBS=16 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
fi
$PY -m geokernels anomaly train --config textures --time-budget "$MINUTES" --out "$OUT/run" "$@" \
  2>&1 | tee "$OUT/train.log"
$PY -m geokernels anomaly eval --checkpoint "$OUT/run/detector.pt" --dataset textures \
  --methods mismatch reconstruction calibrated_mismatch --out "$OUT/eval" --quiet \
  2>&1 | tee "$OUT/eval.log"
mv "$OUT/run/detector.pt" "$OUT/run/train_log.json" "$OUT/eval/metrics.json" \
  "$OUT/eval/metrics.md" "$OUT/"
tar cf "$OUT/overlays.tar" -C "$OUT/eval" overlays
rm -rf "$OUT/run" "$OUT/eval"   # train*.pt (optimiser state) is too big to bring back
ls -la "$OUT"
