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
#include "cuda/common.cuh"
#include "skipkernels.h"

namespace skipkernels {
namespace cuda {
namespace {

__device__ unsigned int g_subset_ce_flags = 0;

constexpr int kDzTile = 32;

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
        z[j] = s * c;
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
      row_loss = static_cast<double>(m - s * cos[b * K + y]) + log_sum;  // as log_softmax: (m - z_y) + l
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
                   int64_t K, acc_t* __restrict__ W, acc_t* __restrict__ row_part,
                   acc_t* __restrict__ col_part) {
  __shared__ acc_t col_scratch[kThreads / 32][kDzTile];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kDzTile + tx;
  const int64_t col_blocks = gridDim.x;
  const acc_t g = *grad_loss / static_cast<acc_t>(B);
  const acc_t s = *scale;
  const acc_t inv_t = col < K ? inv_clamped(t_norm[col]) : acc_t(0);
  acc_t col_sum = 0;
#pragma unroll
  for (int i = 0; i < kDzTile / (kThreads / 32); ++i) {
    const int64_t row = static_cast<int64_t>(blockIdx.y) * kDzTile + ty + (kThreads / 32) * i;
    acc_t v = 0;
    if (row < B && col < K) {
      const int64_t at = row * K + col;
      const acc_t c = cos[at];
      const acc_t onehot = labels[row] == col ? acc_t(1) : acc_t(0);
      acc_t dz = g * (exp((s * c - row_max[row]) - row_log_sum[row]) - onehot);
      if (grad_logits != nullptr) dz += grad_logits[at];
      W[at] = dz * inv_clamped(f_norm[row]) * inv_t;
      v = dz * c;
    }
    const acc_t row_sum = warp_sum(v);
    if (tx == 0 && row < B) row_part[row * col_blocks + blockIdx.x] = row_sum;
    col_sum += v;
  }
  col_scratch[ty][tx] = col_sum;
  __syncthreads();
  if (ty == 0 && col < K) {
    acc_t q = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) q += col_scratch[w][tx];
    col_part[static_cast<int64_t>(blockIdx.y) * K + col] = q;
  }
}

// out[m, n] = s * acc[m, n] - proj[m] * self[m, n], proj = s * inv^2 * sum (0 when clamped).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void grads_epilogue(const acc_t (&acc)[kThreadRows][kThreadCols],
                                               const acc_t* proj, int64_t m0, int64_t n0,
                                               int64_t M, int64_t E, acc_t s,
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
        const acc_t x = static_cast<acc_t>(self[m * E + n]);
        out[m * E + n] = static_cast<scalar_t>(s * acc[i][j] - proj[ty + 16 * i] * x);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ce_backward_grads(const acc_t* __restrict__ W, const scalar_t* __restrict__ f,
                      const scalar_t* __restrict__ t, const acc_t* __restrict__ scale,
                      const acc_t* __restrict__ f_norm, const acc_t* __restrict__ t_norm,
                      const acc_t* __restrict__ row_part, int64_t col_parts,
                      const acc_t* __restrict__ col_part, int64_t row_parts, int64_t B, int64_t K,
                      int64_t E, int64_t f_row_blocks, scalar_t* __restrict__ grad_f,
                      scalar_t* __restrict__ grad_t, acc_t* __restrict__ grad_scale) {
  __shared__ acc_t As[kTileR][kTileM + 1];
  __shared__ acc_t Bs[kTileR][kTileN + 1];
  __shared__ acc_t proj[kTileM];
  __shared__ double scratch[32];
  const int tid = threadIdx.x;
  const acc_t s = *scale;
  const acc_t eps = static_cast<acc_t>(kNormEps);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  NoTileHook hook;
  acc_t acc[kThreadRows][kThreadCols];
  if (blockIdx.y < f_row_blocks) {
    // grad_f rows m0.. : A = W (B x K, contiguous along k), B-operand = t (K x E).
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
    auto load_w = [&](int64_t m, int64_t k) { return W[m * K + k]; };
    auto load_t = [&](int64_t k, int64_t n) { return static_cast<acc_t>(t[k * E + n]); };
    tile_gemm<acc_t, true, false>(acc, m0, n0, B, E, K, load_w, load_t, hook, As, Bs);
    if (tid < kTileM) {
      const int64_t m = m0 + tid;
      acc_t p = 0;
      if (m < B && f_norm[m] >= eps) {
        double r = 0;
        for (int64_t c = 0; c < col_parts; ++c) r += row_part[m * col_parts + c];
        const acc_t inv = inv_clamped(f_norm[m]);
        p = s * inv * inv * static_cast<acc_t>(r);
      }
      proj[tid] = p;
    }
    __syncthreads();
    grads_epilogue(acc, proj, m0, n0, B, E, s, f, grad_f);
  } else {
    // grad_t rows m0.. : A = W^T (K x B, contiguous along k), B-operand = f (B x E).
    const int64_t m0 = static_cast<int64_t>(blockIdx.y - f_row_blocks) * kTileM;
    auto load_wt = [&](int64_t k, int64_t b) { return W[b * K + k]; };
    auto load_f = [&](int64_t b, int64_t n) { return static_cast<acc_t>(f[b * E + n]); };
    tile_gemm<acc_t, false, false>(acc, m0, n0, K, E, B, load_wt, load_f, hook, As, Bs);
    if (tid < kTileM) {
      const int64_t k = m0 + tid;
      acc_t p = 0;
      if (k < K && t_norm[k] >= eps) {
        double q = 0;
        for (int64_t r = 0; r < row_parts; ++r) q += col_part[r * K + k];
        const acc_t inv = inv_clamped(t_norm[k]);
        p = s * inv * inv * static_cast<acc_t>(q);
      }
      proj[tid] = p;
    }
    __syncthreads();
    grads_epilogue(acc, proj, m0, n0, K, E, s, t, grad_t);
  }
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    // grad_scale = sum_bk dz cos = sum of the row partials, in a fixed order.
    double local = 0;
    for (int64_t i = tid; i < B * col_parts; i += blockDim.x) local += static_cast<double>(row_part[i]);
    const double total = block_sum(local, scratch);
    if (tid == 0) *grad_scale = static_cast<acc_t>(total);
  }
}

}  // namespace
}  // namespace cuda

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_cuda(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels_in) {
  using namespace cuda;
  const char* op = "subset_logits_ce";
  check_subset_ce_inputs(image_features, text_features, scale, labels_in, op);
  check_cuda_inputs({&image_features, &text_features, &scale, &labels_in}, op);
  const c10::cuda::CUDAGuard guard(image_features.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::ScalarType acc = compute_dtype(image_features, text_features);
  at::Tensor f = image_features, t = text_features;
  if (f.scalar_type() != t.scalar_type()) {  // mixed inputs: one kernel instantiation, in acc
    f = f.to(acc);
    t = t.to(acc);
  }
  f = f.contiguous();
  t = t.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor s = scale.to(acc).reshape({1}).contiguous();
  const int64_t B = f.size(0), K = t.size(0), E = f.size(1);
  const auto opts = f.options().dtype(acc);
  at::Tensor cos = at::empty({B, K}, opts);
  at::Tensor row_max = at::empty({B}, opts);
  at::Tensor row_log_sum = at::empty({B}, opts);
  at::Tensor f_norm = at::empty({B}, opts);
  at::Tensor t_norm = at::empty({K}, opts);
  at::Tensor loss = at::empty({}, opts);
  const int col_blocks = ceil_div(K, kTileN), row_blocks = ceil_div(B, kTileM);
  TORCH_CHECK_VALUE(row_blocks <= 65535, op, ": batch too large for one grid (B=", B, ")");
  at::Tensor partial = at::empty({B, col_blocks, 2}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "subset_logits_ce_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    ce_forward_tiles<scalar_t, acc_t><<<dim3(col_blocks, row_blocks), kThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), s.data_ptr<acc_t>(), B, K, E,
        cos.data_ptr<acc_t>(), f_norm.data_ptr<acc_t>(), t_norm.data_ptr<acc_t>(),
        partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ce_forward_finalize<acc_t><<<1, kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), col_blocks, cos.data_ptr<acc_t>(), labels.data_ptr<int64_t>(),
        s.data_ptr<acc_t>(), B, K, row_max.data_ptr<acc_t>(), row_log_sum.data_ptr<acc_t>(),
        loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, cos, row_max, row_log_sum, f_norm, t_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_backward_cuda(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels_in, const at::Tensor& cos_in, const at::Tensor& max_in,
    const at::Tensor& log_sum_in, const at::Tensor& image_norm, const at::Tensor& text_norm) {
  using namespace cuda;
  const char* op = "subset_logits_ce_backward";
  check_subset_ce_inputs(image_features, text_features, scale, labels_in, op);
  check_cuda_inputs({&grad_loss, &image_features, &text_features, &scale, &labels_in, &cos_in,
                     &max_in, &log_sum_in, &image_norm, &text_norm},
                    op);
  const int64_t B = image_features.size(0), K = text_features.size(0), E = image_features.size(1);
  TORCH_CHECK_VALUE(cos_in.sizes() == at::IntArrayRef({B, K}) && max_in.numel() == B &&
                        log_sum_in.numel() == B &&
                        image_norm.numel() == B && text_norm.numel() == K,
                    op, ": saved tensors do not match the inputs (cos ", cos_in.sizes(),
                    ", expected (", B, ", ", K, "))");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must hold one value");
  const bool has_grad_logits = grad_logits.has_value() && grad_logits->defined();
  if (has_grad_logits) {
    check_cuda_inputs({&*grad_logits}, op);
    TORCH_CHECK_VALUE(grad_logits->sizes() == at::IntArrayRef({B, K}), op,
                      ": grad_logits must be (B, K')=(", B, ", ", K, "), got ", grad_logits->sizes());
  }
  const c10::cuda::CUDAGuard guard(image_features.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::ScalarType acc = compute_dtype(image_features, text_features);
  at::Tensor f = image_features, t = text_features;
  if (f.scalar_type() != t.scalar_type()) {
    f = f.to(acc);
    t = t.to(acc);
  }
  f = f.contiguous();
  t = t.contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor s = scale.to(acc).reshape({1}).contiguous();
  const at::Tensor g = grad_loss.to(acc).reshape({1}).contiguous();
  const at::Tensor cos = cos_in.to(acc).contiguous();
  const at::Tensor row_max = max_in.to(acc).contiguous();
  const at::Tensor row_log_sum = log_sum_in.to(acc).contiguous();
  const at::Tensor nf = image_norm.to(acc).contiguous();
  const at::Tensor nt = text_norm.to(acc).contiguous();
  const at::Tensor gl = has_grad_logits ? grad_logits->to(acc).contiguous() : at::Tensor();
  const auto opts = f.options().dtype(acc);

  const int dz_col_blocks = ceil_div(K, kDzTile), dz_row_blocks = ceil_div(B, kDzTile);
  const int f_row_blocks = ceil_div(B, kTileM), t_row_blocks = ceil_div(K, kTileM);
  TORCH_CHECK_VALUE(dz_row_blocks <= 65535 && f_row_blocks + t_row_blocks <= 65535, op,
                    ": problem too large for one grid (B=", B, ", K'=", K, ")");
  at::Tensor W = at::empty({B, K}, opts);
  at::Tensor row_part = at::empty({B, dz_col_blocks}, opts);
  at::Tensor col_part = at::empty({dz_row_blocks, K}, opts);
  at::Tensor grad_f = at::empty({B, E}, f.options());
  at::Tensor grad_t = at::empty({K, E}, t.options());
  at::Tensor grad_s = at::empty({}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "subset_logits_ce_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    ce_backward_dz<acc_t><<<dim3(dz_col_blocks, dz_row_blocks), kThreads, 0, stream>>>(
        g.data_ptr<acc_t>(), has_grad_logits ? gl.data_ptr<acc_t>() : nullptr,
        cos.data_ptr<acc_t>(), row_max.data_ptr<acc_t>(), row_log_sum.data_ptr<acc_t>(),
        labels.data_ptr<int64_t>(),
        s.data_ptr<acc_t>(), nf.data_ptr<acc_t>(), nt.data_ptr<acc_t>(), B, K,
        W.data_ptr<acc_t>(), row_part.data_ptr<acc_t>(), col_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ce_backward_grads<scalar_t, acc_t>
        <<<dim3(ceil_div(E, kTileN), f_row_blocks + t_row_blocks), kThreads, 0, stream>>>(
            W.data_ptr<acc_t>(), f.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
            s.data_ptr<acc_t>(), nf.data_ptr<acc_t>(), nt.data_ptr<acc_t>(),
            row_part.data_ptr<acc_t>(), dz_col_blocks, col_part.data_ptr<acc_t>(),
            dz_row_blocks, B, K, E, f_row_blocks, grad_f.data_ptr<scalar_t>(),
            grad_t.data_ptr<scalar_t>(), grad_s.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_f.to(image_features.scalar_type()), grad_t.to(text_features.scalar_type()),
          grad_s.reshape(scale.sizes()).to(scale.scalar_type())};
}

uint32_t subset_ce_cuda_error_flags(int64_t device, bool reset) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  // Kernels on any stream may still be running: wait for the device, then read the word.
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  unsigned int value = 0;
  C10_CUDA_CHECK(cudaMemcpyFromSymbol(&value, cuda::g_subset_ce_flags, sizeof(value)));
  if (reset) {
    const unsigned int zero = 0;
    C10_CUDA_CHECK(cudaMemcpyToSymbol(cuda::g_subset_ce_flags, &zero, sizeof(zero)));
  }
  return value;
}

}  // namespace skipkernels
