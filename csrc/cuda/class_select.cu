// CSkip class selection on CUDA (semantics: skipkernels/ops/class_select.py).
//
// With num_selected >= 0 the op never synchronises with the host, so a training step that calls
// it can be captured in a CUDA graph: bad data cannot raise there, so a label outside [0, C) is
// clamped and a selection whose size differs from num_selected is truncated or padded (with its
// last class); both set a bit in a device-side error word that skipkernels._C.cuda_error_flags()
// reports. No write ever leaves the output tensors. With num_selected < 0 the size is read back
// (one synchronisation) and bad labels raise a ValueError.
//
// Launches: zero the label marks; mark_labels; batch_max_scores (fp64 tiled product with a
// max-over-rows epilogue; grid.y splits the batch, partial maxima per split); rank_keep
// (rank by counting, O(C^2) comparisons, exact and deterministic); compact (one block:
// prefix sum over the keep flags, scatter, label remap).
#include "cuda/common.cuh"
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

}  // namespace
}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> class_select_cuda(const at::Tensor& image_features,
                                                     const at::Tensor& prototypes,
                                                     const at::Tensor& labels_in,
                                                     const at::Tensor& rank_mask_in, int64_t top_k,
                                                     int64_t num_selected) {
  using namespace cuda;
  const char* op = "class_select";
  check_class_select_inputs(image_features, prototypes, labels_in, rank_mask_in, top_k,
                            num_selected);
  check_cuda_inputs({&image_features, &prototypes, &labels_in, &rank_mask_in}, op);
  const c10::cuda::CUDAGuard guard(image_features.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor f = image_features, t = prototypes;
  if (f.scalar_type() != t.scalar_type()) {  // upcasts are exact, so fp64 scores are unchanged
    const at::ScalarType common = compute_dtype(f, t);
    f = f.to(common);
    t = t.to(common);
  }
  f = f.contiguous();
  t = t.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor rank_mask = rank_mask_in.contiguous();
  const int64_t B = f.size(0), C = t.size(0), E = f.size(1);
  TORCH_CHECK_VALUE(C < (int64_t{1} << 31), op, ": too many classes (", C, ")");
  const auto long_opts = labels.options();
  const auto int_opts = labels.options().dtype(at::kInt);

  const bool dynamic = num_selected < 0;
  const int64_t capacity = dynamic ? C : num_selected;
  // Dynamic size: a local error word read back with the size; static size: the device-side word.
  at::Tensor info = dynamic ? at::zeros({2}, long_opts) : at::Tensor();
  unsigned int* flags = dynamic ? reinterpret_cast<unsigned int*>(info.data_ptr<int64_t>() + 1) : nullptr;

  at::Tensor is_label = at::zeros({C}, int_opts);
  at::Tensor clamped = at::empty({B}, long_opts);
  const int splits = static_cast<int>(std::min<int64_t>(ceil_div(B, kTileM), kMaxBatchSplits));
  at::Tensor partial = at::empty({splits, C}, f.options().dtype(at::kDouble));
  at::Tensor keep = at::empty({C}, int_opts);
  at::Tensor position = at::empty({C}, int_opts);
  at::Tensor selected = at::empty({capacity}, long_opts);
  at::Tensor remapped = at::empty({B}, long_opts);

  mark_labels<<<ceil_div(B, kThreads), kThreads, 0, stream>>>(
      labels.data_ptr<int64_t>(), B, C, is_label.data_ptr<int>(), clamped.data_ptr<int64_t>(), flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "class_select_cuda", [&] {
    batch_max_scores<scalar_t><<<dim3(ceil_div(C, kTileN), splits), kThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), B, C, E, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  rank_keep<<<ceil_div(C, kRankThreads), kRankThreads, 0, stream>>>(
      partial.data_ptr<double>(), splits, is_label.data_ptr<int>(), rank_mask.data_ptr<bool>(), C,
      top_k, keep.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  compact<<<1, kCompactThreads, 0, stream>>>(
      keep.data_ptr<int>(), clamped.data_ptr<int64_t>(), B, C, capacity, !dynamic,
      position.data_ptr<int>(), selected.data_ptr<int64_t>(), remapped.data_ptr<int64_t>(),
      dynamic ? info.data_ptr<int64_t>() : nullptr, flags);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (dynamic) {
    const at::Tensor host = info.cpu();  // the one synchronisation of the dynamic-size path
    const int64_t count = host.data_ptr<int64_t>()[0];
    const auto bits = static_cast<uint32_t>(host.data_ptr<int64_t>()[1]);
    TORCH_CHECK_VALUE(!(bits & kClassSelectLabelOutOfRange), op, ": labels must lie in [0, ", C,
                      ")");
    selected = selected.narrow(0, 0, count);
  }
  return {selected, remapped};
}

uint32_t class_select_cuda_error_flags(int64_t device, bool reset) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  unsigned int value = 0;
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(&value, cuda::g_class_select_flags, sizeof(value)));
  if (reset) {
    const unsigned int zero = 0;
    C10_CUDA_CHECK(cudaMemcpyToSymbol(cuda::g_class_select_flags, &zero, sizeof(zero)));
  }
  return value;
}

}  // namespace skipkernels
