// Registration of the torch.ops.skipkernels.* operators and the skipkernels._C module.
//
// Schemas (all inputs may be non-contiguous; the kernels make contiguous copies where needed):
//
// class_select(image_features (B, E), prototypes (C, E), labels (B,) int, rank_mask (C-K,) bool,
//              top_k K, num_selected) -> (selected (K',) int64 ascending, remapped (B,) int64)
//   num_selected >= 0 declares K' (no host synchronisation on CUDA); -1 lets the op find it.
//
// subset_logits_ce(image_features (B, E), text_features (K', E), scale 0-d, labels (B,) int)
//   -> (loss 0-d, cos (B, K'), row_max (B,), row_log_sum (B,), image_norm (B,), text_norm (K',))
//   loss = CE(scale * cos, labels) averaged over the batch, cos = normalize(f) @ normalize(t)^T;
//   the logits are scale * cos, their row log-sum-exp is row_max + row_log_sum (kept apart for
//   precision, see cpu/subset_ce.cpp), the norms are the raw L2 norms of the rows. Outputs are
//   float64 for float64 inputs, else float32.
//
// subset_logits_ce_backward(grad_loss 0-d, grad_logits (B, K')?, image_features, text_features,
//   scale, labels, cos, row_max, row_log_sum, image_norm, text_norm)
//   -> (grad_image, grad_text, grad_scale)
//   grad_logits is the gradient reaching the logits output when the caller uses it (or None).
//   Gradients come back in the dtypes of image_features, text_features and scale.
//
// class_scores_topk(image_features (B, E), text_features (C, E), scale, k, labels?, chunk_size)
//   -> (values (B, min(k, C)) float32, indices (B, min(k, C)) int64, loss 0-d float32 or None)
//
// Fake (meta) implementations are registered from Python in skipkernels/_ext.py.
//
// Under torch.autocast every op is an fp32 op, as torch's own losses are (autocast's fp32 list):
// it takes its inputs in the dtypes they come in (a bf16 / fp16 tower's features included),
// computes and accumulates in float32 (float64 for float64 inputs), and returns the outputs above
// in those dtypes. Its body runs with autocast excluded, so the ATen calls inside it (the CPU
// kernels' at::mm, class_scores_topk's at::matmul) run in the op's compute dtype instead of being
// recast to the autocast dtype.
#include <torch/extension.h>

#include "skipkernels.h"

TORCH_LIBRARY(skipkernels, m) {
  m.set_python_module("skipkernels._ext");
  m.def(
      "class_select(Tensor image_features, Tensor prototypes, Tensor labels, Tensor rank_mask, "
      "int top_k, int num_selected) -> (Tensor selected, Tensor remapped)");
  m.def(
      "subset_logits_ce(Tensor image_features, Tensor text_features, Tensor scale, Tensor labels) "
      "-> (Tensor loss, Tensor cos, Tensor row_max, Tensor row_log_sum, Tensor image_norm, "
      "Tensor text_norm)");
  m.def(
      "subset_logits_ce_backward(Tensor grad_loss, Tensor? grad_logits, Tensor image_features, "
      "Tensor text_features, Tensor scale, Tensor labels, Tensor cos, Tensor row_max, "
      "Tensor row_log_sum, Tensor image_norm, Tensor text_norm) -> (Tensor grad_image, "
      "Tensor grad_text, Tensor grad_scale)");
  m.def(
      "class_scores_topk(Tensor image_features, Tensor text_features, Tensor scale, int k, "
      "Tensor? labels, int chunk_size) -> (Tensor values, Tensor indices, Tensor? loss)");
}

TORCH_LIBRARY_IMPL(skipkernels, CPU, m) {
  m.impl("class_select", &skipkernels::class_select_cpu);
  m.impl("subset_logits_ce", &skipkernels::subset_logits_ce_cpu);
  m.impl("subset_logits_ce_backward", &skipkernels::subset_logits_ce_backward_cpu);
  m.impl("class_scores_topk", &skipkernels::class_scores_topk_impl);
}

namespace {

// The Autocast kernel of every op: the op again, below autocast (see the top of this file).
void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_without_autocast(torch::Library& m) {
  for (const char* name : {"class_select", "subset_logits_ce", "subset_logits_ce_backward",
                           "class_scores_topk"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(skipkernels, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(skipkernels, AutocastCUDA, m) { register_without_autocast(m); }

#ifdef SKIPKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(skipkernels, CUDA, m) {
  m.impl("class_select", &skipkernels::class_select_cuda);
  m.impl("subset_logits_ce", &skipkernels::subset_logits_ce_cuda);
  m.impl("subset_logits_ce_backward", &skipkernels::subset_logits_ce_backward_cuda);
  m.impl("class_scores_topk", &skipkernels::class_scores_topk_impl);
}
#endif

namespace {

bool built_with_cuda() {
#ifdef SKIPKERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Error word of the CUDA ops on one device (see CudaErrorBits); 0 when CUDA was not built.
int64_t cuda_error_flags(int64_t device, bool reset) {
#ifdef SKIPKERNELS_WITH_CUDA
  return static_cast<int64_t>(skipkernels::class_select_cuda_error_flags(device, reset) |
                              skipkernels::subset_ce_cuda_error_flags(device, reset));
#else
  (void)device;
  (void)reset;
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "skipkernels compiled ops (registered as torch.ops.skipkernels.*)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cuda_error_flags", &cuda_error_flags, pybind11::arg("device"), pybind11::arg("reset") = true,
        "Bit mask of errors the CUDA ops flagged on a device without synchronising "
        "(1: class_select label out of range, 2: class_select size != num_selected, "
        "4: subset_logits_ce label out of range); reset clears it");
  m.attr("CLASS_SELECT_LABEL_OUT_OF_RANGE") = static_cast<int>(skipkernels::kClassSelectLabelOutOfRange);
  m.attr("CLASS_SELECT_COUNT_MISMATCH") = static_cast<int>(skipkernels::kClassSelectCountMismatch);
  m.attr("SUBSET_CE_LABEL_OUT_OF_RANGE") = static_cast<int>(skipkernels::kSubsetCeLabelOutOfRange);
}
