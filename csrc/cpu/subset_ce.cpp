// Class-subset logits + cross-entropy fused with the feature normalisation, on the CPU
// (semantics: skipkernels/ops/subset_ce.py), and the chunked top-k evaluation op.
//
// Forward, with f (B, E), t (K, E) un-normalised, s = scale, y = labels:
//   nf_b = ||f_b||, nt_k = ||t_k||, if_b = 1 / max(nf_b, eps), it_k = 1 / max(nt_k, eps)
//   cos_bk = (f_b . t_k) * if_b * it_k          (the raw product, scaled: no normalised copies)
//   z_bk = s * cos_bk, m_b = max_k z_bk, l_b = log sum_k exp(z_bk - m_b)
//   loss = mean_b((m_b - z_b,y_b) + l_b)
// Saved for backward: cos (B, K), m (B,), l (B,), nf (B,), nt (K,). The log-sum-exp is kept as
// m + l rather than rounded into one number: with CLIP's scale (~100) the logits are O(100), and
// rounding m + l to float32 would cost softmax = exp(z - m - l) as much precision again as the
// logits' own rounding; split, the backward's softmax is as accurate as log_softmax's.
//
// Backward, with g the incoming gradient of the loss and G the optional one of the logits:
//   dz_bk = g / B * (exp((z_bk - m_b) - l_b) - [k == y_b]) + G_bk     (gradient wrt logits)
//   grad_s = sum_bk dz_bk cos_bk
//   W_bk = dz_bk * if_b * it_k
//   grad_f_b = s * (W t)_b - s * if_b^2 * r_b * f_b,   r_b = sum_k dz_bk cos_bk
//   grad_t_k = s * (W^T f)_k - s * it_k^2 * q_k * t_k, q_k = sum_b dz_bk cos_bk
// The second terms are the projection of F.normalize's backward; they vanish for a row whose
// norm is below eps (the clamp then has no gradient), exactly as in autograd of the reference.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "skipkernels.h"

namespace skipkernels {

namespace {

template <typename acc_t>
void row_norms(const acc_t* x, int64_t rows, int64_t cols, acc_t* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const acc_t* row = x + r * cols;
      double sum = 0;  // row reductions accumulate in double: cheap here, and no worse than torch
      for (int64_t e = 0; e < cols; ++e) sum += static_cast<double>(row[e]) * row[e];
      out[r] = static_cast<acc_t>(std::sqrt(sum));
    }
  });
}

template <typename acc_t>
inline acc_t inv_clamped(acc_t norm) {
  return acc_t(1) / std::max(norm, static_cast<acc_t>(kNormEps));
}

void check_labels_in_range(const at::Tensor& labels, int64_t num_classes, const char* op) {
  const int64_t* ptr = labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < labels.numel(); ++b) {
    TORCH_CHECK_VALUE(ptr[b] >= 0 && ptr[b] < num_classes, op, ": labels must lie in [0, ",
                      num_classes, "), got ", ptr[b], " at position ", b);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_cpu(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels_in) {
  const char* op = "subset_logits_ce";
  check_subset_ce_inputs(image_features, text_features, scale, labels_in, op);
  const at::ScalarType acc = compute_dtype(image_features, text_features);
  const at::Tensor f = image_features.to(acc).contiguous();
  const at::Tensor t = text_features.to(acc).contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t B = f.size(0), K = t.size(0), E = f.size(1);
  check_labels_in_range(labels, K, op);

  at::Tensor f_norm = at::empty({B}, f.options());
  at::Tensor t_norm = at::empty({K}, f.options());
  at::Tensor row_max = at::empty({B}, f.options());
  at::Tensor row_log_sum = at::empty({B}, f.options());
  at::Tensor loss = at::empty({}, f.options());
  at::Tensor cos = at::mm(f, t.t()).contiguous();  // raw dots, scaled in place below

  AT_DISPATCH_FLOATING_TYPES(acc, "subset_logits_ce_cpu", [&] {
    using acc_t = scalar_t;
    row_norms(f.data_ptr<acc_t>(), B, E, f_norm.data_ptr<acc_t>());
    row_norms(t.data_ptr<acc_t>(), K, E, t_norm.data_ptr<acc_t>());
    const acc_t s = scale.to(acc).item<acc_t>();
    const acc_t* nf = f_norm.data_ptr<acc_t>();
    const acc_t* nt = t_norm.data_ptr<acc_t>();
    std::vector<acc_t> inv_t(K);
    for (int64_t k = 0; k < K; ++k) inv_t[k] = inv_clamped(nt[k]);
    acc_t* cos_ptr = cos.data_ptr<acc_t>();
    acc_t* max_ptr = row_max.data_ptr<acc_t>();
    acc_t* log_sum_ptr = row_log_sum.data_ptr<acc_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    std::vector<double> row_loss(B);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t* row = cos_ptr + b * K;
        const acc_t inv_f = inv_clamped(nf[b]);
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t k = 0; k < K; ++k) {
          row[k] *= inv_f * inv_t[k];
          m = std::max(m, s * row[k]);
        }
        double sum = 0;
        if (std::isinf(m)) {
          sum = 1;  // every logit is +inf or -inf: let the lse carry the infinity
        } else {
          for (int64_t k = 0; k < K; ++k) sum += static_cast<double>(std::exp(s * row[k] - m));
        }
        const double log_sum = std::log(sum);
        max_ptr[b] = m;
        log_sum_ptr[b] = static_cast<acc_t>(log_sum);
        row_loss[b] = static_cast<double>(m - s * row[y[b]]) + log_sum;
      }
    });
    // The batch mean in double in a fixed order: deterministic and at least as accurate as torch.
    double total = 0;
    for (int64_t b = 0; b < B; ++b) total += row_loss[b];
    loss.fill_(static_cast<acc_t>(total / static_cast<double>(B)));
  });
  return {loss, cos, row_max, row_log_sum, f_norm, t_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_backward_cpu(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels_in, const at::Tensor& cos_in, const at::Tensor& max_in,
    const at::Tensor& log_sum_in, const at::Tensor& image_norm, const at::Tensor& text_norm) {
  const char* op = "subset_logits_ce_backward";
  const bool has_grad_logits = check_subset_ce_backward_inputs(
      grad_loss, grad_logits, image_features, text_features, scale, labels_in, cos_in, max_in,
      log_sum_in, image_norm, text_norm);
  const at::ScalarType acc = compute_dtype(image_features, text_features);
  const int64_t B = image_features.size(0), K = text_features.size(0);
  const at::Tensor f = image_features.to(acc).contiguous();
  const at::Tensor t = text_features.to(acc).contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  check_labels_in_range(labels, K, op);
  const at::Tensor cos = cos_in.to(acc).contiguous();
  const at::Tensor row_max = max_in.to(acc).contiguous();
  const at::Tensor row_log_sum = log_sum_in.to(acc).contiguous();
  const at::Tensor nf_t = image_norm.to(acc).contiguous();
  const at::Tensor nt_t = text_norm.to(acc).contiguous();
  const at::Tensor gl = has_grad_logits ? grad_logits->to(acc).contiguous() : at::Tensor();

  at::Tensor W = at::empty({B, K}, f.options());
  at::Tensor grad_f, grad_t, grad_s;
  AT_DISPATCH_FLOATING_TYPES(acc, "subset_logits_ce_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t s = scale.to(acc).item<acc_t>();
    const acc_t g = grad_loss.to(acc).item<acc_t>() / static_cast<acc_t>(B);
    const acc_t* cos_ptr = cos.data_ptr<acc_t>();
    const acc_t* max_ptr = row_max.data_ptr<acc_t>();
    const acc_t* log_sum_ptr = row_log_sum.data_ptr<acc_t>();
    const acc_t* nf = nf_t.data_ptr<acc_t>();
    const acc_t* nt = nt_t.data_ptr<acc_t>();
    const acc_t* gl_ptr = has_grad_logits ? gl.data_ptr<acc_t>() : nullptr;
    const int64_t* y = labels.data_ptr<int64_t>();
    acc_t* w_ptr = W.data_ptr<acc_t>();
    std::vector<acc_t> inv_t(K);
    std::vector<double> r(B), q(K, 0.0);
    for (int64_t k = 0; k < K; ++k) inv_t[k] = inv_clamped(nt[k]);

    // dz and r from the rows.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double rs = 0;
        for (int64_t k = 0; k < K; ++k) {
          const acc_t c = cos_ptr[b * K + k];
          const acc_t p = std::exp((s * c - max_ptr[b]) - log_sum_ptr[b]);
          acc_t dz = g * (p - (k == y[b] ? acc_t(1) : acc_t(0)));
          if (gl_ptr) dz += gl_ptr[b * K + k];
          rs += static_cast<double>(dz) * c;
          w_ptr[b * K + k] = dz;  // scaled by the inverse norms once q is formed
        }
        r[b] = rs;
      }
    });
    // q from the columns (a separate pass keeps it deterministic without per-thread copies).
    at::parallel_for(0, K, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t k = begin; k < end; ++k) q[k] += static_cast<double>(w_ptr[b * K + k]) * cos_ptr[b * K + k];
      }
    });
    double ds = 0;
    for (int64_t b = 0; b < B; ++b) ds += r[b];
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t inv_f = inv_clamped(nf[b]);
        for (int64_t k = 0; k < K; ++k) w_ptr[b * K + k] *= inv_f * inv_t[k];
      }
    });

    grad_f = at::mm(W, t);      // (B, E)
    grad_t = at::mm(W.t(), f);  // (K, E)
    const int64_t E = f.size(1);
    acc_t* gf = grad_f.data_ptr<acc_t>();
    acc_t* gt = grad_t.data_ptr<acc_t>();
    const acc_t* fp = f.data_ptr<acc_t>();
    const acc_t* tp = t.data_ptr<acc_t>();
    const acc_t eps = static_cast<acc_t>(kNormEps);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t inv_f = inv_clamped(nf[b]);
        const acc_t proj = nf[b] >= eps ? s * inv_f * inv_f * static_cast<acc_t>(r[b]) : acc_t(0);
        for (int64_t e = 0; e < E; ++e) gf[b * E + e] = s * gf[b * E + e] - proj * fp[b * E + e];
      }
    });
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const acc_t proj = nt[k] >= eps ? s * inv_t[k] * inv_t[k] * static_cast<acc_t>(q[k]) : acc_t(0);
        for (int64_t e = 0; e < E; ++e) gt[k * E + e] = s * gt[k * E + e] - proj * tp[k * E + e];
      }
    });
    grad_s = at::full(scale.sizes(), static_cast<acc_t>(ds), f.options());
  });
  return {grad_f.to(image_features.scalar_type()), grad_t.to(text_features.scalar_type()),
          grad_s.to(scale.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Chunked scores + top-k + optional loss for large class sets (device-generic: ATen ops only).
// Same computation, chunk by chunk, as class_scores_topk_chunked in subset_ce.py, so its results
// match that function bit for bit; peak extra memory O(chunk * (B + E)).

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> class_scores_topk_impl(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    int64_t k, const std::optional<at::Tensor>& labels_opt, int64_t chunk_size) {
  const char* op = "class_scores_topk";
  check_pair(image_features, text_features, op, "text_features");
  check_scale(image_features, scale, op);
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  const bool has_labels = labels_opt.has_value() && labels_opt->defined();
  const int64_t B = image_features.size(0), C = text_features.size(0);
  at::Tensor labels;
  if (has_labels) {
    check_labels(image_features, *labels_opt, op);
    labels = labels_opt->to(at::kLong);
    // Evaluation only: a host read of the label range is acceptable here.
    const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < C, op, ": labels must lie in [0, ", C, "), got range [", lo,
                      ", ", hi, "]");
  }
  k = std::min(k, C);
  const auto fopts = image_features.options().dtype(at::kFloat);
  const double eps = kNormEps;
  const at::Tensor f32 = image_features.to(at::kFloat);
  // F.normalize: x / ||x||.clamp_min(eps)
  const at::Tensor f = f32 / at::linalg_vector_norm(f32, 2, {-1}, true).clamp_min(eps);
  const at::Tensor s = scale.to(at::kFloat).reshape({});
  at::Tensor best_values = at::full({B, 0}, -std::numeric_limits<float>::infinity(), fopts);
  at::Tensor best_indices = at::zeros({B, 0}, fopts.dtype(at::kLong));
  at::Tensor running_max = at::full({B}, -std::numeric_limits<float>::infinity(), fopts);
  at::Tensor running_sum = at::zeros({B}, fopts);
  at::Tensor target_logit = at::zeros({B}, fopts);
  for (int64_t start = 0; start < C; start += chunk_size) {
    const int64_t n = std::min(chunk_size, C - start);
    const at::Tensor t32 = text_features.narrow(0, start, n).to(at::kFloat);
    const at::Tensor t = t32 / at::linalg_vector_norm(t32, 2, {-1}, true).clamp_min(eps);
    const at::Tensor logits = s * at::matmul(f, t.t());
    auto [chunk_values, chunk_idx] = at::topk(logits, std::min(k, n), 1);
    const at::Tensor values = at::cat({best_values, chunk_values}, 1);
    const at::Tensor indices = at::cat({best_indices, chunk_idx + start}, 1);
    auto [top_values, order] = at::topk(values, std::min(k, values.size(1)), 1);
    best_values = top_values;
    best_indices = indices.gather(1, order);
    if (has_labels) {
      const at::Tensor new_max = at::maximum(running_max, logits.amax({1}));
      running_sum = running_sum * at::exp(running_max - new_max) +
                    at::exp(logits - new_max.unsqueeze(1)).sum(1);
      running_max = new_max;
      const at::Tensor inside = (labels >= start).logical_and(labels < start + n);
      const at::Tensor local = (labels - start).clamp(0, n - 1);
      target_logit = at::where(inside, logits.gather(1, local.unsqueeze(1)).squeeze(1), target_logit);
    }
  }
  std::optional<at::Tensor> loss;
  if (has_labels) loss = (running_max + at::log(running_sum) - target_logit).mean();
  return {best_values, best_indices, loss};
}

}  // namespace skipkernels
