// Device helpers shared by the CUDA ops: a small shared-memory tiled GEMM with pluggable operand
// loaders (the products here are at most (B, K') x E, too small to be worth cuBLAS's launch and
// workspace, and fusing the epilogues saves whole passes), and deterministic reductions.
#pragma once

#include <ATen/ATen.h>

#include "cuda/launch.h"

#include <cstdint>
#include <type_traits>

namespace skipkernels {
namespace cuda {

constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks unless noted
constexpr int kTileM = 32;     // output rows per block
constexpr int kTileN = 64;     // output columns per block
constexpr int kTileR = 16;     // reduction chunk staged in shared memory
constexpr int kThreadRows = kTileM / 16;  // thread (ty, tx) = (tid / 16, tid % 16) owns rows
constexpr int kThreadCols = kTileN / 16;  // ty + 16 i and columns tx + 16 j of the tile

static_assert(kThreads == 256, "the tile layout assumes 16 x 16 threads");

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

template <typename acc_t>
__device__ __forceinline__ acc_t inv_clamped(acc_t norm) {
  constexpr acc_t eps = static_cast<acc_t>(1e-12);
  return acc_t(1) / (norm > eps ? norm : eps);
}

// Sum over the 16-lane group sharing one tile row (lanes tid^1..tid^8 stay inside the group).
template <typename T>
__device__ __forceinline__ T group16_sum(T v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
template <typename T>
__device__ __forceinline__ T group16_max(T v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the whole block in a fixed order (deterministic). Every thread must call it; the
// result is valid in all threads. `scratch` holds at least 32 values.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// Inclusive prefix sum of one int per thread over the block; `total` gets the block's sum.
// `scratch` holds 32 ints.
__device__ __forceinline__ int block_inclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += y;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += y;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  total = scratch[warps - 1];
  return v + (warp > 0 ? scratch[warp - 1] : 0);
}

struct NoTileHook {
  template <typename A, typename B>
  __device__ __forceinline__ void operator()(const A&, const B&) const {}
};

// acc[i][j] = sum_r A(m0 + ty + 16 i, r) * B(r, n0 + tx + 16 j) over r in [0, R).
// load_a(m, r) / load_b(r, n) are only called in bounds; out-of-range elements are zero.
// kAContigR / kBContigR say whether the operand is contiguous along r, which picks the thread
// mapping that keeps global loads coalesced. hook(As, Bs) runs on every staged chunk.
template <typename acc_t, bool kAContigR, bool kBContigR, typename LoadA, typename LoadB,
          typename Hook>
__device__ __forceinline__ void tile_gemm(acc_t (&acc)[kThreadRows][kThreadCols], int64_t m0,
                                          int64_t n0, int64_t M, int64_t N, int64_t R,
                                          const LoadA& load_a, const LoadB& load_b, Hook& hook,
                                          acc_t (&As)[kTileR][kTileM + 1],
                                          acc_t (&Bs)[kTileR][kTileN + 1]) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int i = 0; i < kThreadRows; ++i)
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) acc[i][j] = acc_t(0);

  for (int64_t r0 = 0; r0 < R; r0 += kTileR) {
#pragma unroll
    for (int idx = tid; idx < kTileM * kTileR; idx += kThreads) {
      const int m = kAContigR ? idx / kTileR : idx % kTileM;
      const int r = kAContigR ? idx % kTileR : idx / kTileM;
      const int64_t gm = m0 + m, gr = r0 + r;
      As[r][m] = (gm < M && gr < R) ? load_a(gm, gr) : acc_t(0);
    }
#pragma unroll
    for (int idx = tid; idx < kTileN * kTileR; idx += kThreads) {
      const int n = kBContigR ? idx / kTileR : idx % kTileN;
      const int r = kBContigR ? idx % kTileR : idx / kTileN;
      const int64_t gn = n0 + n, gr = r0 + r;
      Bs[r][n] = (gn < N && gr < R) ? load_b(gr, gn) : acc_t(0);
    }
    __syncthreads();
    hook(As, Bs);
#pragma unroll
    for (int r = 0; r < kTileR; ++r) {
      acc_t a[kThreadRows], b[kThreadCols];
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i) a[i] = As[r][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kThreadCols; ++j) b[j] = Bs[r][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i)
#pragma unroll
        for (int j = 0; j < kThreadCols; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

// Calls fn(scalar_t{}) for the feature dtype of a launch (the launchers' only dispatch: it
// cannot throw, unlike AT_DISPATCH).
template <typename Fn>
cudaError_t by_dtype(Dtype dtype, const Fn& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(float{});
    case Dtype::kFloat16: return fn(at::Half{});
    case Dtype::kBFloat16: return fn(at::BFloat16{});
    case Dtype::kFloat64: return fn(double{});
  }
  return cudaErrorInvalidValue;
}

// Reads an op's device-side error word (and clears it when `reset`). Kernels on any stream may
// still be running: it waits for the device first.
template <typename Word>
cudaError_t read_flag_word(const Word& symbol, unsigned int* value, bool reset) noexcept {
  cudaError_t err = cudaDeviceSynchronize();
  if (err == cudaSuccess) err = cudaMemcpyFromSymbol(value, symbol, sizeof(*value));
  if (err == cudaSuccess && reset) {
    const unsigned int zero = 0;
    err = cudaMemcpyToSymbol(symbol, &zero, sizeof(zero));
  }
  return err;
}

}  // namespace cuda
}  // namespace skipkernels
