// Declarations shared by the op registration (ops.cpp), the CPU kernels (cpu/*.cpp) and the CUDA
// kernels (cuda/*.cu). Only ATen is included so the .cu files stay cheap to compile.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace skipkernels {

// F.normalize's clamp: x / max(||x||, eps).
constexpr double kNormEps = 1e-12;

// Bits of the device-side error word the CUDA ops raise instead of reading data on the host
// (which would synchronise). Read and cleared with skipkernels._C.cuda_error_flags().
enum CudaErrorBits : uint32_t {
  kClassSelectLabelOutOfRange = 1u,    // a label was outside [0, C); it was clamped
  kClassSelectCountMismatch = 2u,      // the selection size differed from num_selected
  kSubsetCeLabelOutOfRange = 4u,       // a label was outside [0, K'); its loss term became NaN
};

// ---------------------------------------------------------------------------------------------
// Input checks shared by every backend. Each raises a Python ValueError / TypeError with the op
// name, so a wrong call never reaches a kernel.

inline void check_float_features(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
                   op, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
                   x.scalar_type());
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& x, const char* op,
                              const char* name) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), op, ": ", name, " is on ", x.device(),
                    " but image_features is on ", ref.device(), "; move all inputs to one device");
}

inline void check_labels(const at::Tensor& features, const at::Tensor& labels, const char* op) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
                   ": labels must be an int64 or int32 tensor, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0), op,
                    ": labels must be (B,) with B=", features.size(0), ", got ", labels.sizes());
  check_same_device(features, labels, op, "labels");
}

inline void check_pair(const at::Tensor& image, const at::Tensor& other, const char* op,
                       const char* other_name) {
  TORCH_CHECK_VALUE(image.dim() == 2 && other.dim() == 2, op,
                    ": expected image_features (B, E) and ", other_name, " (C, E), got ",
                    image.sizes(), " and ", other.sizes());
  TORCH_CHECK_VALUE(image.size(1) == other.size(1), op, ": feature width mismatch: image ",
                    image.size(1), " vs ", other_name, " ", other.size(1));
  TORCH_CHECK_VALUE(image.size(0) >= 1, op, ": needs at least one image (B >= 1)");
  TORCH_CHECK_VALUE(other.size(0) >= 1, op, ": needs at least one class (", other_name,
                    " has 0 rows)");
  check_float_features(image, op, "image_features");
  check_float_features(other, op, other_name);
  check_same_device(image, other, op, other_name);
}

inline void check_scale(const at::Tensor& image, const at::Tensor& scale, const char* op) {
  TORCH_CHECK_VALUE(scale.numel() == 1, op, ": scale must hold one value (a 0-d tensor), got shape ",
                    scale.sizes());
  check_float_features(scale, op, "scale");
  check_same_device(image, scale, op, "scale");
}

inline void check_class_select_inputs(const at::Tensor& image, const at::Tensor& prototypes,
                                      const at::Tensor& labels, const at::Tensor& rank_mask,
                                      int64_t top_k, int64_t num_selected) {
  const char* op = "class_select";
  check_pair(image, prototypes, op, "prototypes");
  check_labels(image, labels, op);
  const int64_t C = prototypes.size(0);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= C, op, ": top_k must be in [1, C=", C, "], got ", top_k);
  TORCH_CHECK_VALUE(rank_mask.scalar_type() == at::kBool && rank_mask.dim() == 1 &&
                        rank_mask.size(0) == C - top_k,
                    op, ": rank_mask must be bool of shape (C-K,)=(", C - top_k, ",), got ",
                    rank_mask.scalar_type(), " ", rank_mask.sizes());
  check_same_device(image, rank_mask, op, "rank_mask");
  TORCH_CHECK_VALUE(num_selected < 0 || (num_selected >= top_k && num_selected <= C), op,
                    ": num_selected must be -1 (unknown) or in [top_k=", top_k, ", C=", C,
                    "], got ", num_selected);
}

inline void check_subset_ce_inputs(const at::Tensor& image, const at::Tensor& text,
                                   const at::Tensor& scale, const at::Tensor& labels,
                                   const char* op) {
  check_pair(image, text, op, "text_features");
  check_scale(image, scale, op);
  check_labels(image, labels, op);
}

// The backward's own inputs; returns whether grad_logits was given.
inline bool check_subset_ce_backward_inputs(const at::Tensor& grad_loss,
                                            const std::optional<at::Tensor>& grad_logits,
                                            const at::Tensor& image, const at::Tensor& text,
                                            const at::Tensor& scale, const at::Tensor& labels,
                                            const at::Tensor& cos, const at::Tensor& row_max,
                                            const at::Tensor& row_log_sum,
                                            const at::Tensor& image_norm,
                                            const at::Tensor& text_norm) {
  const char* op = "subset_logits_ce_backward";
  check_subset_ce_inputs(image, text, scale, labels, op);
  const int64_t B = image.size(0), K = text.size(0);
  TORCH_CHECK_VALUE(cos.sizes() == at::IntArrayRef({B, K}) && row_max.numel() == B &&
                        row_log_sum.numel() == B && image_norm.numel() == B &&
                        text_norm.numel() == K,
                    op, ": saved tensors do not match the inputs (cos ", cos.sizes(),
                    ", expected (", B, ", ", K, "))");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must hold one value");
  const bool has_grad_logits = grad_logits.has_value() && grad_logits->defined();
  if (has_grad_logits) {
    TORCH_CHECK_VALUE(grad_logits->sizes() == at::IntArrayRef({B, K}), op,
                      ": grad_logits must be (B, K')=(", B, ", ", K, "), got ", grad_logits->sizes());
  }
  return has_grad_logits;
}

// Compute dtype of the loss ops: float64 when an input is float64 (lets gradcheck run), else
// float32 (half and bfloat16 inputs are upcast).
inline at::ScalarType compute_dtype(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// Ops. Schemas are in ops.cpp; see there for the meaning of each output.

std::tuple<at::Tensor, at::Tensor> class_select_cpu(const at::Tensor& image_features,
                                                    const at::Tensor& prototypes,
                                                    const at::Tensor& labels,
                                                    const at::Tensor& rank_mask, int64_t top_k,
                                                    int64_t num_selected);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_cpu(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels);

std::tuple<at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_backward_cpu(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels, const at::Tensor& cos, const at::Tensor& row_max,
    const at::Tensor& row_log_sum, const at::Tensor& image_norm, const at::Tensor& text_norm);

// Device-generic (ATen only): registered for CPU and, when built, CUDA.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> class_scores_topk_impl(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    int64_t k, const std::optional<at::Tensor>& labels, int64_t chunk_size);

#ifdef SKIPKERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> class_select_cuda(const at::Tensor& image_features,
                                                     const at::Tensor& prototypes,
                                                     const at::Tensor& labels,
                                                     const at::Tensor& rank_mask, int64_t top_k,
                                                     int64_t num_selected);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_cuda(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels);

std::tuple<at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_backward_cuda(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels, const at::Tensor& cos, const at::Tensor& row_max,
    const at::Tensor& row_log_sum, const at::Tensor& image_norm, const at::Tensor& text_norm);

// Error words of the two CUDA translation units on `device` (synchronises; for checks only).
uint32_t class_select_cuda_error_flags(int64_t device, bool reset);
uint32_t subset_ce_cuda_error_flags(int64_t device, bool reset);
#endif

}  // namespace skipkernels
