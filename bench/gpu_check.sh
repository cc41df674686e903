#!/usr/bin/env bash
# The whole GPU check in one call of at most 9 minutes on a fresh H200/H100 machine, build included:
#   bash bench/gpu_check.sh OUT
# The run has a budget (GPU_CHECK_BUDGET_S, 540 s): each stage's limit is cut to what is left of
# it, and a stage that would start with under 20 s left is skipped and says so. Stages run in order
# of what they prove, so the last ones (7c's inference and class counts) are the first to go.
# 1. build the compiled ops with their CUDA kernels the way a pip-installed package does on first
#    use: the just-in-time build into the cache (skipkernels build), which every stage loads;  (about 1 min)
# 2. tests/cuda, each test at most 30 s (pytest-timeout), junit XML;
# 3. the bad-input table once under compute-sanitizer memcheck, where the machine has it;
# 4. set-up time of the first all-Triton step with an empty, then a warm Triton cache, and the
#    kernel profile of the CUDA-graph step (bench/gpu_setup_profile.py);
# 5. the op microbenchmarks and the measured table backend=auto reads;
# 6. the end-to-end comparison at batch 4 (skipkernels bench, every mode side by side, with the
#    peak memory of each and where it goes), then finetune's own steady step under --step auto and
#    eager at ViT-B/16, C = 500 (skipkernels bench --finetune), beside bench's for the same step;
# 6c. the Skip step's peak memory at ViT-B/16 with the optimizer update after and inside backward,
#    and inside it with working copies of the GEMM weights (bench/update_memory.py);
# 6d. skipkernels plan's predicted peak by kind beside the measured one (bench's memory split) at
#    ViT-B/16 and ViT-L/14, batch 4, C = 100 (bench/memory_table.py --compare);
# 6e. weight casts per step and the eager step's time, without and with working copies, at
#    ViT-B/16 in skip and lora modes (bench/weight_casts.py);
# 7. the step of other model families: EVA02-B-16, and a Hugging Face CLIP ViT-B/16 (transformers
#    CLIPModel, random weights, written by bench/hf_clip_folder.py: the machine reaches no hub);
# 7c. after training, at ViT-B/16: image -> logits latency per tuning method (skipkernels bench
#    --inference), and the training step, peak memory and K′ at C = 1,000 and 21,841 (--classes);
# 8. one summary table, last.
# Every stage has its own time limit, so a hang costs that stage, not the run. Uses the machine's
# own torch; open_clip_torch, ftfy and wcwidth wheels, when present in .whl/, are installed first
# (the GPU machine has no network).
set -uo pipefail
if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUT   (OUT: the folder for results, logs and caches)" >&2
  exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG="$OUT/gpu-check.log"
: >"$LOG"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
START_S=$(date +%s)
stage() {  # stage LIMIT_S CMD...: prints the exit code, "skipped" when the budget is spent
  local limit=$1 left=$(( BUDGET_S - ($(date +%s) - START_S) - 12 )); shift
  if [ "$left" -lt 20 ]; then echo "stage skipped, budget spent: $*" >>"$LOG"; echo skipped; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1; echo $?
}

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/skipkernels-site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH="$PWD:/tmp/skipkernels-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import open_clip, ftfy" >>"$LOG" 2>&1; then
  log "open_clip_torch / ftfy not importable: put their wheels in .whl/ (pip download --no-deps --only-binary=:all: \
--python-version 3.12 --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 ftfy wcwidth) and carry it"
  exit 2
fi

# Tests compile into one cache; the set-up measurement starts from another, empty one (Triton
# kernels and GEMM tile choices), which every later stage then reuses warm.
export SKIPKERNELS_CACHE="$OUT/cache/tests" TRITON_CACHE_DIR="$OUT/cache/tests/triton"
run_cache() {  # the compiled ops are not part of the set-up being measured: that cache shares them
  mkdir -p "$OUT/cache/run" && ln -sfn "$OUT/cache/tests/ops" "$OUT/cache/run/ops"
  export SKIPKERNELS_CACHE="$OUT/cache/run" TRITON_CACHE_DIR="$OUT/cache/run/triton"
}

log "1 build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
export TORCH_CUDA_ARCH_LIST
rm -f skipkernels/_C*.so skipkernels/_C.build.json  # no stale in-place build shadows the one under test
rc_build=$(MAX_JOBS="${MAX_JOBS:-16}" stage 150 "$PY" -m skipkernels build)
"$PY" -m skipkernels info --json >"$OUT/info.json" 2>>"$LOG"
git rev-parse HEAD >"$OUT/commit.txt" 2>/dev/null || true

log "2 tests/cuda (30 s per test)"
per_test=(--timeout=30)
"$PY" -c "import pytest_timeout" 2>/dev/null || { per_test=(); log "pytest-timeout missing: no per-test limit"; }
rc_tests=$(stage 150 "$PY" -m pytest tests/cuda -q -p no:cacheprovider "${per_test[@]}" \
  --junitxml="$OUT/tests-cuda.xml")

log "3 compute-sanitizer memcheck of the bad-input table"
if command -v compute-sanitizer >/dev/null 2>&1; then
  rc_sanitizer=$(stage 40 compute-sanitizer --tool memcheck --log-file "$OUT/memcheck.txt" \
    "$PY" -m pytest tests/cuda/test_cuda_bad_inputs.py -q -p no:cacheprovider)
  tail -3 "$OUT/memcheck.txt" >>"$LOG" 2>/dev/null
else
  rc_sanitizer=n/a
fi

log "4 all-Triton set-up: empty Triton cache, then warm; profile of the graph step"
run_cache
rc_cold=$(stage 60 "$PY" bench/gpu_setup_profile.py "$OUT/setup-cold.json" --mode skip-triton-graph)
rc_warm=$(stage 40 "$PY" bench/gpu_setup_profile.py "$OUT/setup-warm.json" --mode skip-triton-graph --profile 10)
rc_prof=$(stage 40 "$PY" bench/gpu_setup_profile.py "$OUT/profile-skip-graph.json" --mode skip-graph --profile 10)

log "5 op microbenchmarks and the measured table"
rc_kernels=$(stage 60 "$PY" -m pytest bench/test_bench_triton.py bench/test_bench_cskip.py --benchmark-only -q \
  -p no:cacheprovider --benchmark-json="$OUT/kernels.json" --benchmark-max-time=0.1 --benchmark-min-rounds=3)
"$PY" -m skipkernels.ops.measured "$OUT/kernels.json" >>"$LOG" 2>&1 \
  && cp skipkernels/ops/measured_wins.json "$OUT/measured_wins.json"

log "6 end-to-end, batch 4 (paper-style baseline, compiled competitor, ours)"
rc_e2e=$(stage 150 "$PY" -m skipkernels bench --out "$OUT" --repeats 20 --no-epoch \
  --modes paper,ft,skip-ref,skip-compile-graphs,skip-kernels,skip-triton,skip-graph,skip-triton-graph)

log "6b finetune's steady step, ViT-B/16 batch 4, C = 500: --step auto and eager, beside bench's"
rc_ft=$(stage 120 "$PY" -m skipkernels bench --out "$OUT/finetune" --repeats 10 --no-epoch --no-memory \
  --modes skip-kernels,skip-graph --finetune auto,eager)

log "6c peak memory of the Skip step, ViT-B/16 batch 4, C = 100: optimizer update after and inside backward"
rc_upd=$(stage 60 "$PY" bench/update_memory.py --device cuda --model ViT-B-16 --omega 6 --classes 100 --batch 4 \
  --out "$OUT/update-memory-vitb16.json")
log "6c exit: $rc_upd (results: $OUT/update-memory-vitb16.json)"

log "6d plan's predicted peak by kind beside the measured one: ViT-B/16 and ViT-L/14, batch 4, C = 100"
rc_plan=$(stage 120 "$PY" bench/memory_table.py --compare ViT-B-16,ViT-L-14 --device cuda \
  --modes skip-kernels,skip-graph,ft --out "$OUT/plan-vs-measured.json")
log "6d exit: $rc_plan (results: $OUT/plan-vs-measured.json; the side-by-side lines are in this log)"

log "6e weight casts and the eager step, autocast's casts vs working copies: ViT-B/16 batch 4, C = 100"
rc_casts=$(stage 60 "$PY" bench/weight_casts.py --device cuda --modes skip,lora --classes 100 --batch 4 \
  --repeats 20 --out "$OUT/weight-casts-vitb16.json")
log "6e exit: $rc_casts (results: $OUT/weight-casts-vitb16.json)"

log "7 another family: EVA02-B-16 (timm Eva image tower, rotary embeddings), batch 4"
rc_eva=$(stage 60 "$PY" -m skipkernels bench --out "$OUT/eva02" --model EVA02-B-16 --repeats 10 --no-epoch \
  --no-memory --modes skip-ref,skip-kernels,skip-graph)

log "7b Hugging Face CLIP ViT-B/16 (transformers CLIPModel, random weights), batch 4"
rc_hf=$(stage 60 bash -c "'$PY' bench/hf_clip_folder.py '$OUT/hf-clip-b16' && '$PY' -m skipkernels bench \
  --out '$OUT/hf-clip' --model 'hf:$OUT/hf-clip-b16' --repeats 10 --no-epoch --no-memory \
  --modes skip-ref,skip-kernels,skip-graph")

log "7c ViT-B/16 after training: image -> logits per method (batch 1, 64; eager, compiled), and the step against C"
rc_inf=$(stage 60 "$PY" -m skipkernels bench --inference --no-compile --out "$OUT/inference" --repeats 10 \
  --warmup 3 --modes zero-shot,skip,coop,vlpet-large,adapter,lora,lora-merged)
rc_infc=$(stage 90 "$PY" -m skipkernels bench --inference --out "$OUT/inference-compiled" --repeats 10 --warmup 3 \
  --modes zero-shot,skip)
rc_cls=$(stage 150 "$PY" -m skipkernels bench --classes 1000,21841 --out "$OUT/classes" --repeats 5 --warmup 2 \
  --modes skip,ft,coop,lskip-lora)
log "7c exit: inference $rc_inf, compiled $rc_infc, class scaling $rc_cls (results: $OUT/inference*, $OUT/classes)"

log "8 summary"
"$PY" - "$OUT" "$rc_build" "$rc_tests" "$rc_sanitizer" "$rc_cold" "$rc_warm" "$rc_prof" "$rc_kernels" "$rc_e2e" "$rc_ft" "$rc_eva" "$rc_hf" "$rc_plan" "$rc_casts" <<'PY' | tee -a "$LOG"
import glob, json, os, sys
import xml.etree.ElementTree as ET
out, *codes = sys.argv[1:]
names = ["build", "tests/cuda", "memcheck", "set-up cold", "set-up warm", "profile", "kernels", "e2e",
         "finetune step", "EVA02", "HF CLIP", "plan vs peak", "weight casts"]
rows = [(n, c) for n, c in zip(names, codes)]
print(f"{'stage':<14} exit")
for name, code in rows:
    print(f"{name:<14} {code}{'  (timed out)' if code in ('124', '130', '137') else ''}")
try:
    suite = ET.parse(os.path.join(out, "tests-cuda.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    print("tests/cuda: {tests} tests, {failures} failed, {errors} errors, {skipped} skipped".format(**suite.attrib))
except Exception as err:
    print("tests/cuda: no junit XML", err)
for name in ("setup-cold", "setup-warm", "profile-skip-graph"):
    try:
        r = json.load(open(os.path.join(out, name + ".json")))
        print(f"{name:<19} set-up {r['setup_s']:6.1f} s  step {r['step_ms_median']:7.2f} ms  "
              f"tile benchmarks {r['gemm_tile_benchmarks']}  peak {r['peak_mb']:.0f} MB")
    except Exception as err:
        print(f"{name:<19} missing ({err})")
for path in sorted(glob.glob(os.path.join(out, "e2e-*.json")) + glob.glob(os.path.join(out, "eva02", "e2e-*.json"))
                   + glob.glob(os.path.join(out, "hf-clip", "e2e-*.json"))):
    results = json.load(open(path))["results"]
    base = results.get("paper", {}).get("step_s", {}).get("median")
    for mode, v in results.items():
        if "step_s" not in v:
            print(f"e2e {mode:<20} {v.get('skipped') or v}")
            continue
        step = v["step_s"]["median"]
        mem = v.get("memory", {})
        parts = " ".join(f"{k} {x:.0f}" for k, x in mem.get("breakdown_mb", {}).items())
        predicted = mem.get("predicted_mb") or {}
        planned = f"  plan {sum(predicted.values()):7.0f} MB" if predicted else ""
        copies = v.get("step", {}).get("working_copies", "n/a")
        copies = copies.split(" ")[0] if copies.startswith(("on", "off")) else "n/a"  # n/a: not the Trainer's step
        print(f"e2e {mode:<20} {step * 1e3:8.2f} ms  {base / step if base else float('nan'):6.2f}x paper  "
              f"peak {mem.get('peak_mb', float('nan')):7.0f} MB{planned}  copies {copies}  {parts}")
try:
    for mode, variants in json.load(open(os.path.join(out, "weight-casts-vitb16.json")))["modes"].items():
        for name, r in variants.items():
            print(f"casts {mode:<5} {name:<15} forward {r['forward_casts']:4d}  backward+update "
                  f"{r['backward_and_update_casts']:4d}  eager step {r['step_ms_median']:8.2f} ms")
except Exception as err:
    print(f"weight casts missing ({err})")
for path in sorted(glob.glob(os.path.join(out, "finetune", "e2e-*.json"))):
    for kind, r in json.load(open(path)).get("finetune", {}).items():
        print(f"finetune --step {kind:<6} {r['steady_step_ms']:8.2f} ms a step, bench {r['bench_mode']} "
              f"{r['bench_step_ms'] or float('nan'):.2f} ms ({r['vs_bench'] or float('nan'):.2f}x)  step: {r['step']}")
PY
log "done: $OUT"
