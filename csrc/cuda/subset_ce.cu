// Class-subset logits + cross-entropy fused with the feature normalisation, on CUDA.
// Formulas: see csrc/cpu/subset_ce.cpp. Two launches forward, two backward, no host
// synchronisation (a label outside [0, K') makes its loss term NaN and sets an error bit that
// skipkernels._C.cuda_error_flags() reports; no memory outside the tensors is touched).
//
// Forward
//   1. ce_forward_tiles: a (32 x 64) tile of f t^T per block, with the row norms of f and t
//      accumulated from the same staged chunks; writes cos and, per (row, column block), the
//      partial max and sum of exp of the logits.
//   2. ce_forward_finalize (one block): combines the partials into the row max and log-sum,
//      gathers the target logits and reduces the batch mean in a fixed order (deterministic).
// Backward
//   1. ce_backward_dz: dz on (32 x 32) tiles; W = dz * if_b * it_k, and the partial row and
//      column sums of dz * cos.
//   2. ce_backward_grads: one grid holding both products, grad_f = s W t - proj and
//      grad_t = s W^T f - proj, with the normalisation's projection in the epilogue; block (0, 0)
//      also sums grad_scale.
//
// Precision. The logits are the rounded product s * cos, as in the reference: nvcc would contract
// `m - s * cos` into an FMA and make the loss of a single class 1e-7 instead of exactly 0, so those
// products are written with mul_rn. The backward forms dz, W, the row / column sums and both
// products in double whatever the feature dtype: its reductions run over K' (up to thousands of
// classes) serially per thread, and in float that made grad f 4x less accurate than PyTorch's
// cuBLAS path. The products are at most (B, K') x E, so double costs microseconds.
//
// Host side (checks, allocations): subset_ce_host.cpp.
#include "cuda/common.cuh"
#include "cuda/launch.h"
#include "skipkernels.h"

namespace skipkernels {
namespace cuda {
namespace {

__device__ unsigned int g_subset_ce_flags = 0;

constexpr int kDzTile = 32;

// a * b rounded, never contracted into a neighbouring add.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Sum of squares of the rows staged in shared memory, in double (96 threads, 16 terms per chunk).
template <typename acc_t>
struct RowNormHook {
  double sumsq = 0;
  __device__ __forceinline__ void operator()(const acc_t (&As)[kTileR][kTileM + 1],
                                             const acc_t (&Bs)[kTileR][kTileN + 1]) {
    const int tid = threadIdx.x;
    if (tid < kTileM) {
#pragma unroll
      for (int r = 0; r < kTileR; ++r) sumsq += static_cast<double>(As[r][tid]) * As[r][tid];
    } else if (tid < kTileM + kTileN) {
#pragma unroll
      for (int r = 0; r < kTileR; ++r) {
        sumsq += static_cast<double>(Bs[r][tid - kTileM]) * Bs[r][tid - kTileM];
      }
    }
  }
};

// exp(z - m), exactly 1 when z == m so that rows of infinities give +-inf rather than NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t exp_shift(acc_t z, acc_t m) {
  return z == m ? acc_t(1) : exp(z - m);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_forward_tiles(const scalar_t* __restrict__ f, const scalar_t* __restrict__ t,
                     const acc_t* __restrict__ scale, int64_t B, int64_t K, int64_t E,
                     acc_t* __restrict__ cos, acc_t* __restrict__ f_norm,
                     acc_t* __restrict__ t_norm, acc_t* __restrict__ partial) {
  __shared__ acc_t As[kTileR][kTileM + 1];
  __shared__ acc_t Bs[kTileR][kTileN + 1];
  __shared__ acc_t inv_row[kTileM];
  __shared__ acc_t inv_col[kTileN];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int64_t col_blocks = gridDim.x;

  auto load_f = [&](int64_t m, int64_t e) { return static_cast<acc_t>(f[m * E + e]); };
  auto load_t = [&](int64_t e, int64_t n) { return static_cast<acc_t>(t[n * E + e]); };
  RowNormHook<acc_t> hook;
  acc_t acc[kThreadRows][kThreadCols];
  tile_gemm<acc_t, true, true>(acc, m0, n0, B, K, E, load_f, load_t, hook, As, Bs);

  if (tid < kTileM) {
    const acc_t norm = static_cast<acc_t>(sqrt(hook.sumsq));
    inv_row[tid] = inv_clamped(norm);
    if (blockIdx.x == 0 && m0 + tid < B) f_norm[m0 + tid] = norm;
  } else if (tid < kTileM + kTileN) {
    const int c = tid - kTileM;
    const acc_t norm = static_cast<acc_t>(sqrt(hook.sumsq));
    inv_col[c] = inv_clamped(norm);
    if (blockIdx.y == 0 && n0 + c < K) t_norm[n0 + c] = norm;
  }
  __syncthreads();

  const acc_t s = *scale;
  const acc_t neg_inf = -INFINITY;
#pragma unroll
  for (int i = 0; i < kThreadRows; ++i) {
    const int lr = ty + 16 * i;
    const int64_t row = m0 + lr;
    acc_t z[kThreadCols];
    acc_t m = neg_inf;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) {
      const int lc = tx + 16 * j;
      const int64_t col = n0 + lc;
      z[j] = neg_inf;
      if (row < B && col < K) {
        const acc_t c = acc[i][j] * inv_row[lr] * inv_col[lc];
        cos[row * K + col] = c;
        z[j] = mul_rn(s, c);
        m = fmax(m, z[j]);
      }
    }
    m = group16_max(m);
    acc_t sum = 0;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (row < B && col < K) sum += exp_shift(z[j], m);
    }
    sum = group16_sum(sum);
    if (tx == 0 && row < B) {
      partial[(row * col_blocks + blockIdx.x) * 2 + 0] = m;
      partial[(row * col_blocks + blockIdx.x) * 2 + 1] = sum;
    }
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_forward_finalize(const acc_t* __restrict__ partial, int64_t col_blocks,
                        const acc_t* __restrict__ cos, const int64_t* __restrict__ labels,
                        const acc_t* __restrict__ scale, int64_t B, int64_t K,
                        acc_t* __restrict__ row_max, acc_t* __restrict__ row_log_sum,
                        acc_t* __restrict__ loss) {
  __shared__ double scratch[32];
  const acc_t s = *scale;
  double local = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const acc_t* p = partial + b * col_blocks * 2;
    acc_t m = -INFINITY;
    for (int64_t cb = 0; cb < col_blocks; ++cb) m = fmax(m, p[2 * cb]);
    double sum = 0;  // B * (K' / 64) terms: double costs nothing here
    for (int64_t cb = 0; cb < col_blocks; ++cb) {
      sum += static_cast<double>(p[2 * cb + 1]) * exp_shift(static_cast<double>(p[2 * cb]), static_cast<double>(m));
    }
    const double log_sum = log(sum);
    row_max[b] = m;
    row_log_sum[b] = static_cast<acc_t>(log_sum);
    const int64_t y = labels[b];
    double row_loss;
    if (y < 0 || y >= K) {
      atomicOr(&g_subset_ce_flags, static_cast<unsigned int>(kSubsetCeLabelOutOfRange));
      row_loss = NAN;
    } else {
      row_loss = static_cast<double>(m - mul_rn(s, cos[b * K + y])) + log_sum;  // as log_softmax: (m - z_y) + l
    }
    local += row_loss;
  }
  const double total = block_sum(local, scratch);
  if (threadIdx.x == 0) *loss = static_cast<acc_t>(total / static_cast<double>(B));
}

// Block: 32 columns x 8 warps; each warp covers rows ty, ty + 8, ty + 16, ty + 24 of the tile.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_backward_dz(const acc_t* __restrict__ grad_loss, const acc_t* __restrict__ grad_logits,
                   const acc_t* __restrict__ cos, const acc_t* __restrict__ row_max,
                   const acc_t* __restrict__ row_log_sum,
                   const int64_t* __restrict__ labels, const acc_t* __restrict__ scale,
                   const acc_t* __restrict__ f_norm, const acc_t* __restrict__ t_norm, int64_t B,
                   int64_t K, double* __restrict__ W, double* __restrict__ row_part,
                   double* __restrict__ col_part) {
  __shared__ double col_scratch[kThreads / 32][kDzTile];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kDzTile + tx;
  const int64_t col_blocks = gridDim.x;
  const double g = static_cast<double>(*grad_loss) / static_cast<double>(B);
  const acc_t s = *scale;
  const double inv_t = col < K ? static_cast<double>(inv_clamped(t_norm[col])) : 0.0;
  double col_sum = 0;
#pragma unroll
  for (int i = 0; i < kDzTile / (kThreads / 32); ++i) {
    const int64_t row = static_cast<int64_t>(blockIdx.y) * kDzTile + ty + (kThreads / 32) * i;
    double v = 0;
    if (row < B && col < K) {
      const int64_t at = row * K + col;
      const acc_t c = cos[at];
      const double onehot = labels[row] == col ? 1.0 : 0.0;
      const double z = static_cast<double>(mul_rn(s, c));  // the logit, rounded as in the forward
      double dz = g * (exp((z - static_cast<double>(row_max[row])) - static_cast<double>(row_log_sum[row])) - onehot);
      if (grad_logits != nullptr) dz += static_cast<double>(grad_logits[at]);
      W[at] = dz * static_cast<double>(inv_clamped(f_norm[row])) * inv_t;
      v = dz * static_cast<double>(c);
    }
    const double row_sum = warp_sum(v);
    if (tx == 0 && row < B) row_part[row * col_blocks + blockIdx.x] = row_sum;
    col_sum += v;
  }
  col_scratch[ty][tx] = col_sum;
  __syncthreads();
  if (ty == 0 && col < K) {
    double q = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) q += col_scratch[w][tx];
    col_part[static_cast<int64_t>(blockIdx.y) * K + col] = q;
  }
}

// out[m, n] = s * acc[m, n] - proj[m] * self[m, n], proj = s * inv^2 * sum (0 when clamped).
template <typename scalar_t>
__device__ __forceinline__ void grads_epilogue(const double (&acc)[kThreadRows][kThreadCols],
                                               const double* proj, int64_t m0, int64_t n0,
                                               int64_t M, int64_t E, double s,
                                               const scalar_t* __restrict__ self,
                                               scalar_t* __restrict__ out) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < kThreadRows; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < kThreadCols; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < E) {
        const double x = static_cast<double>(self[m * E + n]);
        out[m * E + n] = static_cast<scalar_t>(s * acc[i][j] - proj[ty + 16 * i] * x);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_backward_grads(const double* __restrict__ W, const scalar_t* __restrict__ f,
                      const scalar_t* __restrict__ t, const acc_t* __restrict__ scale,
                      const acc_t* __restrict__ f_norm, const acc_t* __restrict__ t_norm,
                      const double* __restrict__ row_part, int64_t col_parts,
                      const double* __restrict__ col_part, int64_t row_parts, int64_t B, int64_t K,
                      int64_t E, int64_t f_row_blocks, scalar_t* __restrict__ grad_f,
                      scalar_t* __restrict__ grad_t, acc_t* __restrict__ grad_scale) {
  __shared__ double As[kTileR][kTileM + 1];
  __shared__ double Bs[kTileR][kTileN + 1];
  __shared__ double proj[kTileM];
  __shared__ double scratch[32];
  const int tid = threadIdx.x;
  const double s = static_cast<double>(*scale);
  const acc_t eps = static_cast<acc_t>(kNormEps);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  NoTileHook hook;
  double acc[kThreadRows][kThreadCols];
  if (blockIdx.y < f_row_blocks) {
    // grad_f rows m0.. : A = W (B x K, contiguous along k), B-operand = t (K x E).
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
    auto load_w = [&](int64_t m, int64_t k) { return W[m * K + k]; };
    auto load_t = [&](int64_t k, int64_t n) { return static_cast<double>(t[k * E + n]); };
    tile_gemm<double, true, false>(acc, m0, n0, B, E, K, load_w, load_t, hook, As, Bs);
    if (tid < kTileM) {
      const int64_t m = m0 + tid;
      double p = 0;
      if (m < B && f_norm[m] >= eps) {
        double r = 0;
        for (int64_t c = 0; c < col_parts; ++c) r += row_part[m * col_parts + c];
        const double inv = static_cast<double>(inv_clamped(f_norm[m]));
        p = s * inv * inv * r;
      }
      proj[tid] = p;
    }
    __syncthreads();
    grads_epilogue(acc, proj, m0, n0, B, E, s, f, grad_f);
  } else {
    // grad_t rows m0.. : A = W^T (K x B, contiguous along k), B-operand = f (B x E).
    const int64_t m0 = static_cast<int64_t>(blockIdx.y - f_row_blocks) * kTileM;
    auto load_wt = [&](int64_t k, int64_t b) { return W[b * K + k]; };
    auto load_f = [&](int64_t b, int64_t n) { return static_cast<double>(f[b * E + n]); };
    tile_gemm<double, false, false>(acc, m0, n0, K, E, B, load_wt, load_f, hook, As, Bs);
    if (tid < kTileM) {
      const int64_t k = m0 + tid;
      double p = 0;
      if (k < K && t_norm[k] >= eps) {
        double q = 0;
        for (int64_t r = 0; r < row_parts; ++r) q += col_part[r * K + k];
        const double inv = static_cast<double>(inv_clamped(t_norm[k]));
        p = s * inv * inv * q;
      }
      proj[tid] = p;
    }
    __syncthreads();
    grads_epilogue(acc, proj, m0, n0, K, E, s, t, grad_t);
  }
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    // grad_scale = sum_bk dz cos = sum of the row partials, in a fixed order.
    double local = 0;
    for (int64_t i = tid; i < B * col_parts; i += blockDim.x) local += row_part[i];
    const double total = block_sum(local, scratch);
    if (tid == 0) *grad_scale = static_cast<acc_t>(total);
  }
}

template <typename scalar_t>
cudaError_t launch_forward_typed(const SubsetCeForwardLaunch& a, cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  ce_forward_tiles<scalar_t, acc_t>
      <<<dim3(a.col_blocks, subset_ce_forward_row_blocks(a.B)), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(a.image_features),
          static_cast<const scalar_t*>(a.text_features), static_cast<const acc_t*>(a.scale), a.B,
          a.K, a.E, static_cast<acc_t*>(a.cos), static_cast<acc_t*>(a.image_norm),
          static_cast<acc_t*>(a.text_norm), static_cast<acc_t*>(a.partial));
  ce_forward_finalize<acc_t><<<1, kThreads, 0, stream>>>(
      static_cast<const acc_t*>(a.partial), a.col_blocks, static_cast<const acc_t*>(a.cos),
      a.labels, static_cast<const acc_t*>(a.scale), a.B, a.K, static_cast<acc_t*>(a.row_max),
      static_cast<acc_t*>(a.row_log_sum), static_cast<acc_t*>(a.loss));
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward_typed(const SubsetCeBackwardLaunch& a, cudaStream_t stream) {
  using acc_t = acc_type_t<scalar_t>;
  const SubsetCeBackwardGrid grid = subset_ce_backward_grid(a.B, a.K);
  ce_backward_dz<acc_t><<<dim3(grid.dz_col_blocks, grid.dz_row_blocks), kThreads, 0, stream>>>(
      static_cast<const acc_t*>(a.grad_loss), static_cast<const acc_t*>(a.grad_logits),
      static_cast<const acc_t*>(a.cos), static_cast<const acc_t*>(a.row_max),
      static_cast<const acc_t*>(a.row_log_sum), a.labels, static_cast<const acc_t*>(a.scale),
      static_cast<const acc_t*>(a.image_norm), static_cast<const acc_t*>(a.text_norm), a.B, a.K,
      a.W, a.row_part, a.col_part);
  ce_backward_grads<scalar_t, acc_t>
      <<<dim3(ceil_div(a.E, kTileN), grid.f_row_blocks + grid.t_row_blocks), kThreads, 0, stream>>>(
          a.W, static_cast<const scalar_t*>(a.image_features),
          static_cast<const scalar_t*>(a.text_features), static_cast<const acc_t*>(a.scale),
          static_cast<const acc_t*>(a.image_norm), static_cast<const acc_t*>(a.text_norm),
          a.row_part, grid.dz_col_blocks, a.col_part, grid.dz_row_blocks, a.B, a.K, a.E,
          grid.f_row_blocks, static_cast<scalar_t*>(a.grad_image),
          static_cast<scalar_t*>(a.grad_text), static_cast<acc_t*>(a.grad_scale));
  return cudaGetLastError();
}

}  // namespace

int subset_ce_forward_col_blocks(int64_t K) noexcept { return ceil_div(K, kTileN); }
int subset_ce_forward_row_blocks(int64_t B) noexcept { return ceil_div(B, kTileM); }

SubsetCeBackwardGrid subset_ce_backward_grid(int64_t B, int64_t K) noexcept {
  return {ceil_div(K, kDzTile), ceil_div(B, kDzTile), ceil_div(B, kTileM), ceil_div(K, kTileM)};
}

cudaError_t launch_subset_ce_forward(const SubsetCeForwardLaunch& args, cudaStream_t stream) noexcept {
  return by_dtype(args.dtype, [&](auto tag) { return launch_forward_typed<decltype(tag)>(args, stream); });
}

cudaError_t launch_subset_ce_backward(const SubsetCeBackwardLaunch& args, cudaStream_t stream) noexcept {
  return by_dtype(args.dtype, [&](auto tag) { return launch_backward_typed<decltype(tag)>(args, stream); });
}

cudaError_t read_subset_ce_flags(unsigned int* value, bool reset) noexcept {
  return read_flag_word(g_subset_ce_flags, value, reset);
}

}  // namespace cuda
}  // namespace skipkernels
