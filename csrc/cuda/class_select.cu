// CSkip class selection on CUDA (semantics: skipkernels/ops/class_select.py).
//
// With num_selected >= 0 the op never synchronises with the host, so a training step that calls
// it can be captured in a CUDA graph: bad data cannot raise there, so a label outside [0, C) is
// clamped and a selection whose size differs from num_selected is truncated or padded (with its
// last class); both set a bit in a device-side error word that skipkernels._C.cuda_error_flags()
// reports. No write ever leaves the output tensors. With num_selected < 0 the size is read back
// (one synchronisation) and bad labels raise a ValueError.
//
// Host side (checks, allocations, the read-back): class_select_host.cpp.
// Launches: zero the label marks; mark_labels; batch_max_scores (fp64 tiled product with a
// max-over-rows epilogue; grid.y splits the batch, partial maxima per split); rank_keep
// (rank by counting, O(C^2) comparisons, exact and deterministic); compact (one block:
// prefix sum over the keep flags, scatter, label remap).
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "skipkernels.h"

namespace skipkernels {
namespace cuda {
namespace {

__device__ unsigned int g_class_select_flags = 0;

constexpr int kRankThreads = 256;
constexpr int kCompactThreads = 1024;
constexpr int kMaxBatchSplits = 8;

// amax semantics: NaN wins.
__device__ __forceinline__ double nan_max(double a, double b) { return (isnan(a) || a > b) ? a : b; }

// The order of torch.sort(-scores, stable=True): larger first, NaN last, ties by class index.
__device__ __forceinline__ bool ranks_before(double a, int64_t ia, double b, int64_t ib) {
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return nb;
  if (na) return ia < ib;
  if (a != b) return a > b;
  return ia < ib;
}

__global__ void mark_labels(const int64_t* __restrict__ labels, int64_t B, int64_t C,
                            int* __restrict__ is_label, int64_t* __restrict__ clamped,
                            unsigned int* flags) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  int64_t y = labels[b];
  if (y < 0 || y >= C) {
    atomicOr(flags != nullptr ? flags : &g_class_select_flags,
             static_cast<unsigned int>(kClassSelectLabelOutOfRange));
    y = y < 0 ? 0 : C - 1;
  }
  is_label[y] = 1;
  clamped[b] = y;
}

// partial[split, c] = max over the batch rows of this split of <f_b, t_c>, accumulated in fp64.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    batch_max_scores(const scalar_t* __restrict__ f, const scalar_t* __restrict__ t, int64_t B,
                     int64_t C, int64_t E, double* __restrict__ partial) {
  __shared__ double As[kTileR][kTileM + 1];
  __shared__ double Bs[kTileR][kTileN + 1];
  __shared__ double col_max[16][kTileN];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  auto load_f = [&](int64_t b, int64_t e) { return static_cast<double>(f[b * E + e]); };
  auto load_t = [&](int64_t e, int64_t c) { return static_cast<double>(t[c * E + e]); };
  NoTileHook hook;
  double best[kThreadCols];
#pragma unroll
  for (int j = 0; j < kThreadCols; ++j) best[j] = -INFINITY;
  double acc[kThreadRows][kThreadCols];
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM; m0 < B;
       m0 += static_cast<int64_t>(gridDim.y) * kTileM) {
    tile_gemm<double, true, true>(acc, m0, n0, B, C, E, load_f, load_t, hook, As, Bs);
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i) {
      if (m0 + ty + 16 * i >= B) continue;
#pragma unroll
      for (int j = 0; j < kThreadCols; ++j) best[j] = nan_max(best[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int j = 0; j < kThreadCols; ++j) col_max[ty][tx + 16 * j] = best[j];
  __syncthreads();
  if (tid < kTileN && n0 + tid < C) {
    double m = col_max[0][tid];
    for (int r = 1; r < 16; ++r) m = nan_max(m, col_max[r][tid]);
    partial[static_cast<int64_t>(blockIdx.y) * C + n0 + tid] = m;
  }
}

__device__ __forceinline__ double class_key(const double* __restrict__ partial, int splits,
                                            int64_t C, const int* __restrict__ is_label,
                                            int64_t c) {
  if (is_label[c]) return INFINITY;  // labels are forced to the top
  double m = partial[c];
  for (int s = 1; s < splits; ++s) m = nan_max(m, partial[static_cast<int64_t>(s) * C + c]);
  return m;
}

__global__ void __launch_bounds__(kRankThreads)
    rank_keep(const double* __restrict__ partial, int splits, const int* __restrict__ is_label,
              const bool* __restrict__ rank_mask, int64_t C, int64_t top_k, int* __restrict__ keep) {
  __shared__ double keys[kRankThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRankThreads + threadIdx.x;
  const double mine = c < C ? class_key(partial, splits, C, is_label, c) : 0.0;
  int64_t rank = 0;
  for (int64_t base = 0; base < C; base += kRankThreads) {
    const int64_t other = base + threadIdx.x;
    keys[threadIdx.x] = other < C ? class_key(partial, splits, C, is_label, other) : 0.0;
    __syncthreads();
    const int64_t count = C - base < kRankThreads ? C - base : kRankThreads;
    if (c < C) {
      for (int64_t i = 0; i < count; ++i) rank += ranks_before(keys[i], base + i, mine, c);
    }
    __syncthreads();
  }
  if (c < C) {
    const bool kept = rank < top_k || rank_mask[rank - top_k] || is_label[c] != 0;
    keep[c] = kept ? 1 : 0;
  }
}

// One block. selected has room for `capacity` classes; `strict` (num_selected given) flags a
// size mismatch instead of returning it. info (dynamic size only): info[0] = size.
__global__ void __launch_bounds__(kCompactThreads)
    compact(const int* __restrict__ keep, const int64_t* __restrict__ clamped_labels, int64_t B,
            int64_t C, int64_t capacity, bool strict, int* __restrict__ position,
            int64_t* __restrict__ selected, int64_t* __restrict__ remapped,
            int64_t* __restrict__ info, unsigned int* flags) {
  __shared__ int scratch[32];
  int64_t offset = 0;
  for (int64_t base = 0; base < C; base += kCompactThreads) {
    const int64_t c = base + threadIdx.x;
    const int v = c < C ? keep[c] : 0;
    int chunk_total = 0;
    const int inclusive = block_inclusive_scan(v, scratch, chunk_total);
    const int64_t p = offset + inclusive - v;
    if (c < C) {
      position[c] = static_cast<int>(p);
      if (v && p < capacity) selected[p] = c;
    }
    offset += chunk_total;
  }
  __syncthreads();  // position[] and selected[] written above are read by other threads below
  const int64_t total = offset;
  if (strict && total != capacity && threadIdx.x == 0) {
    atomicOr(flags != nullptr ? flags : &g_class_select_flags,
             static_cast<unsigned int>(kClassSelectCountMismatch));
  }
  if (total < capacity) {
    const int64_t last = selected[total - 1];  // total >= top_k >= 1
    for (int64_t i = total + threadIdx.x; i < capacity; i += kCompactThreads) selected[i] = last;
  }
  for (int64_t b = threadIdx.x; b < B; b += kCompactThreads) {
    const int64_t p = position[clamped_labels[b]];
    remapped[b] = p < capacity ? p : capacity - 1;
  }
  if (info != nullptr && threadIdx.x == 0) info[0] = total;
}

template <typename scalar_t>
cudaError_t launch_typed(const ClassSelectLaunch& a, cudaStream_t stream) {
  unsigned int* flags = a.info != nullptr ? reinterpret_cast<unsigned int*>(a.info + 1) : nullptr;
  cudaError_t err = cudaMemsetAsync(a.is_label, 0, sizeof(int) * a.C, stream);
  if (err != cudaSuccess) return err;
  if (a.info != nullptr) {
    err = cudaMemsetAsync(a.info, 0, 2 * sizeof(int64_t), stream);
    if (err != cudaSuccess) return err;
  }
  mark_labels<<<ceil_div(a.B, kThreads), kThreads, 0, stream>>>(a.labels, a.B, a.C, a.is_label,
                                                                a.clamped_labels, flags);
  batch_max_scores<scalar_t><<<dim3(ceil_div(a.C, kTileN), a.splits), kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(a.image_features), static_cast<const scalar_t*>(a.prototypes),
      a.B, a.C, a.E, a.partial);
  rank_keep<<<ceil_div(a.C, kRankThreads), kRankThreads, 0, stream>>>(
      a.partial, a.splits, a.is_label, a.rank_mask, a.C, a.top_k, a.keep);
  compact<<<1, kCompactThreads, 0, stream>>>(a.keep, a.clamped_labels, a.B, a.C, a.capacity,
                                             a.strict, a.position, a.selected, a.remapped, a.info,
                                             flags);
  return cudaGetLastError();
}

}  // namespace

int class_select_splits(int64_t B) noexcept {
  return static_cast<int>(std::min<int64_t>(ceil_div(B, kTileM), kMaxBatchSplits));
}

cudaError_t launch_class_select(const ClassSelectLaunch& args, cudaStream_t stream) noexcept {
  return by_dtype(args.dtype, [&](auto tag) { return launch_typed<decltype(tag)>(args, stream); });
}

cudaError_t read_class_select_flags(unsigned int* value, bool reset) noexcept {
  return read_flag_word(g_class_select_flags, value, reset);
}

}  // namespace cuda
}  // namespace skipkernels
