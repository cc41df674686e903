#!/usr/bin/env bash
# Compile-check of csrc/ with CMake and nvcc: every .cu for sm_80 and sm_90, ops.cpp with its CUDA
# registration enabled, plus the native CPU tests (built and run with ctest). Needs nvcc and the
# torch the project uses (its CPU wheel is enough: no GPU, no CUDA torch).
#
# usage: .ci/cuda_check.sh [python]     (default: python3; pass the venv's python)
set -euo pipefail

PYTHON="${1:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v nvcc >/dev/null 2>&1; then
  for dir in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$dir" ] && [ -x "$dir/bin/nvcc" ]; then
      export PATH="$dir/bin:$PATH"
      break
    fi
  done
fi
NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then
  echo "cuda_check: nvcc not found (set CUDA_HOME or put nvcc on PATH)" >&2
  exit 2
fi
# CMake needs the real toolkit path to find the CUDA headers next to nvcc.
NVCC="$(readlink -f "$NVCC")"

query() { "$PYTHON" -c "$1"; }
TORCH_INCLUDE_DIRS="$(query 'import torch.utils.cpp_extension as c; print(";".join(c.include_paths()))')"
TORCH_LIBRARY_DIR="$(query 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
TORCH_CXX11_ABI="$(query 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
PYTHON_INCLUDE_DIR="$(query 'import sysconfig; print(sysconfig.get_paths()["include"])')"

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/skipkernels-cuda-check.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT

echo "cuda_check: $("$NVCC" --version | tail -n 1); torch include ${TORCH_INCLUDE_DIRS%%;*}"
cmake -S "$ROOT" -B "$BUILD" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DTORCH_INCLUDE_DIRS="$TORCH_INCLUDE_DIRS" \
  -DTORCH_LIBRARY_DIR="$TORCH_LIBRARY_DIR" \
  -DTORCH_CXX11_ABI="$TORCH_CXX11_ABI" \
  -DPYTHON_INCLUDE_DIR="$PYTHON_INCLUDE_DIR"
cmake --build "$BUILD" --parallel "$(nproc 2>/dev/null || echo 2)"
ctest --test-dir "$BUILD" --output-on-failure

# Without libtorch_cuda nothing links, so check the seams by symbol: every skipkernels:: function
# that ops.cpp and the CUDA host wrappers call must be defined by one of the project's objects
# (the launchers live in the .cu objects, compiled by nvcc).
objects() { find "$BUILD/CMakeFiles/$1.dir" -name '*.o'; }
mapfile -t callers < <(objects skipkernels_ops_check; objects skipkernels_cuda_host_check)
mapfile -t all < <(objects skipkernels_cuda_check; objects skipkernels_cuda_host_check; objects test_cpu_kernels)
missing=$(comm -23 \
  <(nm -C --undefined-only "${callers[@]}" | grep -o 'skipkernels::[^(]*' | sort -u) \
  <(nm -C --defined-only "${all[@]}" | grep -o 'skipkernels::[^(]*' | sort -u))
if [ -n "$missing" ]; then
  echo "cuda_check: called but defined nowhere:" >&2
  echo "$missing" >&2
  exit 1
fi
echo "cuda_check: OK (CUDA sources compiled for sm_80 and sm_90; every called symbol defined; native tests passed)"
