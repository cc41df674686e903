#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and a CUDA torch: build skipkernels._C with its CUDA ops, run the
# GPU tests and every benchmark, and write all results (JSON, PNG, logs) to one folder.
#
# usage: bash bench/gpu_suite.sh [OUT_DIR] [budget: quick|full] [STAGES]
#   defaults: bench/results, quick, build,tests,kernels,e2e. STAGES is a comma list, so a machine
#   with a per-command time limit can run the stages in separate calls (build first).
# Uses the machine's own torch (no constraints file: it pins the CPU wheel). Needs open_clip_torch,
# ftfy, pytest and pytest-benchmark importable.
set -uo pipefail
OUT="${1:-bench/results}"
BUDGET="${2:-quick}"
STAGES=",${3:-build,tests,kernels,e2e},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
log() { echo "== $*" | tee -a "$OUT/gpu-suite-$stamp.log"; }

if want build; then
log "build (CUDA ops for ${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST
MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT/gpu-suite-$stamp.log" 2>&1 \
  || { log "build failed"; tail -40 "$OUT/gpu-suite-$stamp.log"; exit 1; }
fi
"$PY" -m skipkernels info --json | tee "$OUT/info-$stamp.json"

if want tests; then
log "GPU tests"
"$PY" -m pytest tests/cuda tests/test_class_select.py tests/test_subset_ce.py tests/test_triton_*.py -q \
  -p no:cacheprovider --junitxml="$OUT/tests-cuda-$stamp.xml" 2>&1 | tail -40 | tee -a "$OUT/gpu-suite-$stamp.log"
fi

if want kernels; then
# The op microbenchmarks first: they make the measured table that backend=auto reads, so the
# block and prefix benchmarks after them time auto with this machine's table.
log "op microbenchmarks"
"$PY" -m pytest bench/test_bench_triton.py bench/test_bench_pet.py bench/test_bench_cskip.py --benchmark-only -q \
  -p no:cacheprovider --benchmark-json="$OUT/kernels-$stamp.json" --benchmark-max-time=0.5 2>&1 | tail -5 \
  | tee -a "$OUT/gpu-suite-$stamp.log"

log "measured table for backend=auto (skipkernels/ops/measured_wins.json, copied to $OUT)"
"$PY" -m skipkernels.ops.measured "$OUT/kernels-$stamp.json" 2>&1 | tee -a "$OUT/gpu-suite-$stamp.log" \
  && cp skipkernels/ops/measured_wins.json "$OUT/measured_wins-$stamp.json"

log "block and prefix benchmarks"
"$PY" -m pytest bench/test_bench_block.py bench/test_bench_prefix.py --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT/blocks-$stamp.json" --benchmark-max-time=0.5 2>&1 | tail -5 \
  | tee -a "$OUT/gpu-suite-$stamp.log"
fi

if want e2e; then
log "end-to-end"
if [ "$BUDGET" = full ]; then epoch=8000; repeats=30; else epoch=800; repeats=20; fi
"$PY" -m skipkernels bench --out "$OUT" --repeats "$repeats" --epoch-images "$epoch" 2>&1 | tail -20 \
  | tee -a "$OUT/gpu-suite-$stamp.log"
"$PY" -m skipkernels bench --out "$OUT" --batch 32 --repeats "$repeats" --epoch-images "$epoch" --no-memory 2>&1 \
  | tail -20 | tee -a "$OUT/gpu-suite-$stamp.log"
fi
log "done: $OUT"
