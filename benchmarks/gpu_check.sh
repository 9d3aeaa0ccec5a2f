#!/usr/bin/env bash
# One-shot check on a GPU machine: build geokernels from source with that machine's torch, run
# the CUDA and Triton tests, time every op (CUDA events) against the reference eager and
# torch.compile(reference), and report each op's GB/s as a fraction of the measured device copy
# bandwidth. Logs and tables go to $OUT (default ./gpu_out). The whole run keeps within
# GK_TOTAL_S (default 540 s, under the device tool's 600 s per command): each stage gets its own
# limit, cut further so that the stages after it keep their reserve, and writes its results as
# it goes, so a stage that runs out of time cannot hide the others' results. The issue-9 numbers
# (flow_mismatch bench rows, detector images/s) run before the long general bench.
#
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's arch),
# MAX_JOBS (default 16), GK_TOTAL_S, and GK_BUILD_S / GK_TEST_S / GK_BENCH_S / GK_ANOMALY_S
# stage limits in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
fi
export TORCH_CUDA_ARCH_LIST
summary="$OUT/summary.md"
t_start=$(date +%s)
stage() { echo "[$(( $(date +%s) - t_start ))s] $*" | tee -a "$summary"; }
deadline=$(( t_start + ${GK_TOTAL_S:-540} ))
# limit STAGE_MAX RESERVE: seconds a stage may run, leaving RESERVE for the stages after it
limit() {
  local left=$(( deadline - $(date +%s) - $2 ))
  [ "$left" -lt "$1" ] || left=$1
  [ "$left" -gt 10 ] || left=10
  echo "$left"
}

{
  echo "# geokernels GPU check"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+uncommitted changes)')"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- python/torch/triton: $($PY -c 'import sys,torch;import importlib.util as u;t=__import__("triton").__version__ if u.find_spec("triton") else None;print(sys.version.split()[0], torch.__version__, t)')"
  echo "- TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  echo
} > "$summary"

stage "build (pip install --no-build-isolation --no-deps -e .)"
GEOKERNELS_FORCE_CUDA=1 timeout "$(limit "${GK_BUILD_S:-240}" 300)" $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  stage "pip install failed (rc=$rc); trying setup.py build_ext --inplace"
  GEOKERNELS_FORCE_CUDA=1 timeout "$(limit "${GK_BUILD_S:-240}" 300)" $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1 || { stage "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
fi
$PY -m geokernels info > "$OUT/info.txt" 2>&1
{
  echo; echo "## toolchain (for diagnosing C++ runtime mismatches)"
  echo "c++: $(command -v c++) :: $(c++ --version 2>&1 | head -1)"
  echo "nvcc: $(command -v nvcc) :: $(nvcc --version 2>&1 | tail -1)"
  $PY - <<'PYEOF'
import glob, os, torch, geokernels
so = glob.glob(os.path.join(os.path.dirname(geokernels.__file__), "_C*.so"))
print("torch cxx11 abi:", torch._C._GLIBCXX_USE_CXX11_ABI, "| extension:", so)
print("libstdc++ mapped:", sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l}))
PYEOF
} >> "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

# C++ error paths first, in their own process: a crash here must not hide the other results
stage "error paths: raw ops reject bad input with Python exceptions"
timeout "$(limit 60 260)" $PY -m pytest tests -q -p no:cacheprovider -k "raw_op" > "$OUT/error_paths.log" 2>&1
stage "error paths rc=$? :: $(tail -1 "$OUT/error_paths.log")"

stage "tests: CUDA and Triton (-m 'cuda or triton'; -v so that a timeout keeps the results so far)"
timeout "$(limit "${GK_TEST_S:-180}" 160)" $PY -m pytest tests -m "cuda or triton" -v -rfE -p no:cacheprovider > "$OUT/tests.log" 2>&1
stage "tests rc=$? :: $(tail -1 "$OUT/tests.log") :: $(grep -c " PASSED" "$OUT/tests.log") passed, $(grep -cE " (FAILED|ERROR)" "$OUT/tests.log") failed so far"
grep -E "^(FAILED|ERROR)| (FAILED|ERROR)( |$)" "$OUT/tests.log" | head -30 | tee -a "$summary"

# issue 9 first: the fused-vs-reference end-to-end rows ("textures U-Net") and the detector's
# scoring throughput (images/s at the SPEC defaults K=8, T=24) with the shipped checkpoint
stage "bench flow_mismatch on cuda (fused vs reference loop, incl. the textures U-Net rows)"
timeout "$(limit 90 100)" $PY -m geokernels bench --device cuda --ops flow_mismatch \
  --json "$OUT/bench_flow_mismatch.json" > "$OUT/bench_flow_mismatch.txt" 2>&1
stage "bench flow_mismatch rc=$?"
stage "anomaly scoring on cuda (shipped textures detector, 10+10 test crops per category)"
timeout "$(limit "${GK_ANOMALY_S:-90}" 40)" $PY -m geokernels anomaly eval --dataset textures --limit 10 \
  --methods mismatch --overlays 0 --device cuda --quiet --out "$OUT/anomaly_eval" \
  > "$OUT/anomaly_eval.log" 2>&1
stage "anomaly eval rc=$? :: $($PY -c "import json,sys;d=json.load(open(sys.argv[1]));print({k:round(v['images_per_second'],1) for k,v in d['categories'].items()}, 'img/s')" "$OUT/anomaly_eval/metrics.json" 2>&1 | tail -1)"
stage "benchmarks on cuda, the other ops (reference eager, torch.compile(reference), fused backends)"
others=$($PY -c "from geokernels import benchmark as b; b._load_cases(); print(' '.join(sorted({f.bench_op for f in b._CASES} - {'flow_mismatch'})))")
timeout "$(limit "${GK_BENCH_S:-240}" 10)" $PY -m geokernels bench --device cuda --ops $others \
  --json "$OUT/bench_cuda.json" > "$OUT/bench.txt" 2>&1
stage "bench rc=$?"
for f in bench_flow_mismatch.txt bench.txt; do
  # the aligned table when the bench finished, else the rows it measured before the time limit
  if grep -q "^| op " "$OUT/$f"; then rows=$(grep -E "^\|" "$OUT/$f"); else rows=$(grep -o "measured | .*" "$OUT/$f"); fi  # (tqdm shares the line)
  { echo; echo "$f:"; echo '```'; echo "$rows"; echo '```'; } >> "$summary"
done
stage "done"
cat "$summary"
