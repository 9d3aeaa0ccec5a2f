#!/usr/bin/env bash
# One-shot check on a GPU machine: build geokernels from source with that machine's torch, run
# the CUDA and Triton tests, time every op (CUDA events) against the reference eager and
# torch.compile(reference), and report each op's GB/s as a fraction of the measured device copy
# bandwidth. The whole run keeps within GK_TOTAL_S (default 530 s: set it ~60 s under the
# command's timeout): each stage gets its own limit, cut further so that the stages after it keep
# their reserve, and writes its results as it goes, so a stage that runs out of time cannot hide
# the others' results. The issue-9 numbers (flow_mismatch bench rows, detector images/s) run
# before the general bench.
#
# $OUT (default ./gpu_out) holds two files only, whatever happens: summary.md and logs.tgz (every
# stage's log and JSON, re-packed after each stage): the device tool returns at most 8 files.
#
#   OUT=/tmp/gpu_out GK_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: this GPU's arch),
# MAX_JOBS (default 16), GK_TOTAL_S, GK_COMMIT (when the copy has no .git), and
# GK_BUILD_S / GK_TEST_S / GK_BENCH_S / GK_ANOMALY_S stage limits in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gk_logs.XXXXXX")
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
fi
export TORCH_CUDA_ARCH_LIST
summary="$OUT/summary.md"
t_start=$(date +%s)
# re-pack the logs into $OUT/logs.tgz (atomically: a kill leaves the previous bundle)
bundle() { tar czf "$OUT/.logs.tgz.tmp" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/.logs.tgz.tmp" "$OUT/logs.tgz"; }
stage() { echo "[$(( $(date +%s) - t_start ))s] $*" | tee -a "$summary"; bundle; }
deadline=$(( t_start + ${GK_TOTAL_S:-530} ))
# limit STAGE_MAX RESERVE: seconds a stage may run, leaving RESERVE for the stages after it
limit() {
  local left=$(( deadline - $(date +%s) - $2 ))
  [ "$left" -lt "$1" ] || left=$1
  [ "$left" -gt 10 ] || left=10
  echo "$left"
}
# SIGINT first (pytest and the bench print their failures / rows so far), SIGKILL 20 s later
run_for() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }

commit=${GK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
dirty=""
if git rev-parse --git-dir > /dev/null 2>&1 && ! git diff --quiet 2>/dev/null; then dirty=" (+uncommitted changes)"; fi
{
  echo "# geokernels GPU check"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $commit$dirty"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- python/torch/triton: $($PY -c 'import sys,torch;import importlib.util as u;t=__import__("triton").__version__ if u.find_spec("triton") else None;print(sys.version.split()[0], torch.__version__, t)')"
  echo "- TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  echo
} > "$summary"

PIP="$PY -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check -e ."
stage "build ($PIP, CUDA)"
cuda_built=1
GEOKERNELS_FORCE_CUDA=1 run_for "$(limit "${GK_BUILD_S:-240}" 280)" $PIP > "$LOGS/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  # the Triton kernels and the CPU build do not need the CUDA extension: keep checking them
  cuda_built=0
  stage "CUDA BUILD FAILED (rc=$rc; log tail below); building without CUDA to test Triton"
  tail -25 "$LOGS/build.log" | tee -a "$summary"
  GEOKERNELS_NO_CUDA=1 run_for "$(limit 120 250)" $PIP >> "$LOGS/build.log" 2>&1 \
    || { stage "BUILD FAILED without CUDA too"; tail -25 "$LOGS/build.log" | tee -a "$summary"; exit 1; }
fi
$PY -m geokernels info > "$LOGS/info.txt" 2>&1
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
} >> "$LOGS/info.txt" 2>&1
cat "$LOGS/info.txt"

# C++ error paths first, in their own process: a crash here must not hide the other results
stage "error paths: raw ops reject bad input with Python exceptions"
run_for "$(limit 40 290)" $PY -m pytest tests -q -p no:cacheprovider -k "raw_op" > "$LOGS/error_paths.log" 2>&1
stage "error paths rc=$? :: $(tail -1 "$LOGS/error_paths.log")"

# the files whose kernels have never run on a GPU first (a timeout keeps what ran), then the rest
first="qc2_loss qc1_loss cgpm midpoint cfss contour_flow_loss cuda_graphs autocast large_index
       triton_gpu_semantics double_backward flow_mismatch gpu_paths"
files=$(for f in $first; do echo "tests/test_$f.py"; done)
rest=$(ls tests/test_*.py | grep -v -F -x -f <(echo "$files"))
stage "tests: CUDA and Triton (-m 'cuda or triton', never-run kernels first; -v so that a timeout keeps the results so far)"
run_for "$(limit "${GK_TEST_S:-150}" 230)" $PY -m pytest $files $rest -m "cuda or triton" -v -rfE \
  -p no:cacheprovider --continue-on-collection-errors > "$LOGS/tests.log" 2>&1
stage "tests rc=$? :: $(tail -1 "$LOGS/tests.log") :: $(grep -c " PASSED" "$LOGS/tests.log") passed, $(grep -cE " (FAILED|ERROR)" "$LOGS/tests.log") failed so far"
grep -E "^(FAILED|ERROR)| (FAILED|ERROR)( |$)" "$LOGS/tests.log" | head -30 | tee -a "$summary"

# issue 9 first: the fused-vs-reference end-to-end rows ("textures U-Net") and the detector's
# scoring throughput (images/s at the SPEC defaults K=8, T=24) with the shipped checkpoint
stage "bench flow_mismatch on cuda (fused vs reference loop, incl. the textures U-Net rows; its noise kernels)"
run_for "$(limit 60 170)" $PY -m geokernels bench --device cuda --ops flow_mismatch flow_mismatch_noise \
  --json "$LOGS/bench_flow_mismatch.json" > "$LOGS/bench_flow_mismatch.txt" 2>&1
stage "bench flow_mismatch rc=$?"
stage "anomaly scoring on cuda (shipped textures detector, 16+16 test crops per category)"
run_for "$(limit "${GK_ANOMALY_S:-50}" 120)" $PY -m geokernels anomaly eval --dataset textures --limit 16 \
  --methods mismatch --overlays 0 --device cuda --quiet --out "$LOGS/anomaly_eval" \
  > "$LOGS/anomaly_eval.log" 2>&1
stage "anomaly eval rc=$? :: $($PY -c "import json,sys;d=json.load(open(sys.argv[1]));print({k:round(v['images_per_second'],1) for k,v in d['categories'].items()}, 'img/s')" "$LOGS/anomaly_eval/metrics.json" 2>&1 | tail -1)"

# the other ops one process each (a crash or a slow compile costs that op only), those never
# timed on a GPU first, each within its share of what is left
stage "benchmarks on cuda, the other ops (reference eager, torch.compile(reference), fused backends)"
ops="qc2_loss qc1_loss cgpm midpoint_convexify cfss_iterate contour_flow_loss distance_transform contour_flow_field"
known=$($PY -c "from geokernels import benchmark as b; b._load_cases(); print(' '.join(sorted({f.bench_op for f in b._CASES})))" 2>/dev/null || echo "$ops")
n_ops=$(echo $ops | wc -w)
i=0
for op in $ops; do
  i=$((i + 1))
  case " $known " in *" $op "*) ;; *) stage "bench $op: no cases (known: $known)"; continue ;; esac
  share=$(( (deadline - $(date +%s) - 5) / (n_ops - i + 1) ))   # of what is left, per op
  [ "$share" -gt 15 ] || share=15
  [ "$share" -lt "${GK_BENCH_S:-240}" ] || share=${GK_BENCH_S:-240}
  run_for "$(limit "$share" 5)" \
    $PY -m geokernels bench --device cuda --ops "$op" \
    --json "$LOGS/bench_$op.json" > "$LOGS/bench_$op.txt" 2>&1
  stage "bench $op rc=$?"
done
for f in bench_flow_mismatch.txt $(for op in $ops; do echo "bench_$op.txt"; done); do
  [ -f "$LOGS/$f" ] || continue
  # the aligned table when the bench finished, else the rows it measured before the time limit
  if grep -q "^| op " "$LOGS/$f"; then rows=$(grep -E "^\|" "$LOGS/$f"); else rows=$(grep -o "measured | .*" "$LOGS/$f"); fi  # (tqdm shares the line)
  { echo; echo "$f:"; echo '```'; echo "$rows"; echo '```'; } >> "$summary"
done
[ "$cuda_built" -eq 1 ] || echo "NOTE: the CUDA extension did not build; CUDA rows and tests are missing" >> "$summary"
stage "done"
cat "$summary"
