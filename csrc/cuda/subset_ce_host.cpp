// Host side of the CUDA class-subset logits + cross-entropy (kernels: subset_ce.cu): checks,
// allocations and the launches; no host synchronisation. Compiled by the C++ compiler so that
// every error raised here reaches Python as an exception (see cuda/launch.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/host_common.h"
#include "skipkernels.h"

namespace skipkernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_cuda(
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels_in) {
  const char* op = "subset_logits_ce";
  check_subset_ce_inputs(image_features, text_features, scale, labels_in, op);
  cuda::check_cuda_inputs({&image_features, &text_features, &scale, &labels_in}, op);
  const c10::cuda::CUDAGuard guard(image_features.device());

  const at::ScalarType acc = compute_dtype(image_features, text_features);
  const auto [f, t] = cuda::common_features(image_features, text_features, acc);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor s = scale.to(acc).reshape({1}).contiguous();
  const int64_t B = f.size(0), K = t.size(0), E = f.size(1);
  TORCH_CHECK_VALUE(cuda::subset_ce_forward_row_blocks(B) <= cuda::kMaxGridY, op,
                    ": batch too large for one grid (B=", B, ")");
  const auto opts = f.options().dtype(acc);
  cuda::SubsetCeForwardLaunch args{};
  args.dtype = cuda::launch_dtype(f.scalar_type());
  args.B = B;
  args.K = K;
  args.E = E;
  args.col_blocks = cuda::subset_ce_forward_col_blocks(K);
  at::Tensor cos = at::empty({B, K}, opts);
  at::Tensor row_max = at::empty({B}, opts);
  at::Tensor row_log_sum = at::empty({B}, opts);
  at::Tensor f_norm = at::empty({B}, opts);
  at::Tensor t_norm = at::empty({K}, opts);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor partial = at::empty({B, args.col_blocks, 2}, opts);
  args.image_features = f.data_ptr();
  args.text_features = t.data_ptr();
  args.scale = s.data_ptr();
  args.labels = labels.data_ptr<int64_t>();
  args.cos = cos.data_ptr();
  args.row_max = row_max.data_ptr();
  args.row_log_sum = row_log_sum.data_ptr();
  args.image_norm = f_norm.data_ptr();
  args.text_norm = t_norm.data_ptr();
  args.loss = loss.data_ptr();
  args.partial = partial.data_ptr();
  cuda::check_launch(cuda::launch_subset_ce_forward(args, c10::cuda::getCurrentCUDAStream()), op);
  return {loss, cos, row_max, row_log_sum, f_norm, t_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subset_logits_ce_backward_cuda(
    const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_logits,
    const at::Tensor& image_features, const at::Tensor& text_features, const at::Tensor& scale,
    const at::Tensor& labels_in, const at::Tensor& cos_in, const at::Tensor& max_in,
    const at::Tensor& log_sum_in, const at::Tensor& image_norm, const at::Tensor& text_norm) {
  const char* op = "subset_logits_ce_backward";
  const bool has_grad_logits = check_subset_ce_backward_inputs(
      grad_loss, grad_logits, image_features, text_features, scale, labels_in, cos_in, max_in,
      log_sum_in, image_norm, text_norm);
  cuda::check_cuda_inputs({&grad_loss, &image_features, &text_features, &scale, &labels_in, &cos_in,
                           &max_in, &log_sum_in, &image_norm, &text_norm},
                          op);
  if (has_grad_logits) cuda::check_cuda_inputs({&*grad_logits}, op);
  const int64_t B = image_features.size(0), K = text_features.size(0), E = image_features.size(1);
  const cuda::SubsetCeBackwardGrid grid = cuda::subset_ce_backward_grid(B, K);
  TORCH_CHECK_VALUE(grid.dz_row_blocks <= cuda::kMaxGridY &&
                        grid.f_row_blocks + grid.t_row_blocks <= cuda::kMaxGridY,
                    op, ": problem too large for one grid (B=", B, ", K'=", K, ")");
  const c10::cuda::CUDAGuard guard(image_features.device());

  const at::ScalarType acc = compute_dtype(image_features, text_features);
  const auto [f, t] = cuda::common_features(image_features, text_features, acc);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor s = scale.to(acc).reshape({1}).contiguous();
  const at::Tensor g = grad_loss.to(acc).reshape({1}).contiguous();
  const at::Tensor cos = cos_in.to(acc).contiguous();
  const at::Tensor row_max = max_in.to(acc).contiguous();
  const at::Tensor row_log_sum = log_sum_in.to(acc).contiguous();
  const at::Tensor nf = image_norm.to(acc).contiguous();
  const at::Tensor nt = text_norm.to(acc).contiguous();
  const at::Tensor gl = has_grad_logits ? grad_logits->to(acc).contiguous() : at::Tensor();
  const auto wide = f.options().dtype(at::kDouble);
  at::Tensor W = at::empty({B, K}, wide);
  at::Tensor row_part = at::empty({B, grid.dz_col_blocks}, wide);
  at::Tensor col_part = at::empty({grid.dz_row_blocks, K}, wide);
  at::Tensor grad_f = at::empty({B, E}, f.options());
  at::Tensor grad_t = at::empty({K, E}, t.options());
  at::Tensor grad_s = at::empty({}, f.options().dtype(acc));

  cuda::SubsetCeBackwardLaunch args{};
  args.dtype = cuda::launch_dtype(f.scalar_type());
  args.grad_loss = g.data_ptr();
  args.grad_logits = has_grad_logits ? gl.data_ptr() : nullptr;
  args.image_features = f.data_ptr();
  args.text_features = t.data_ptr();
  args.scale = s.data_ptr();
  args.labels = labels.data_ptr<int64_t>();
  args.cos = cos.data_ptr();
  args.row_max = row_max.data_ptr();
  args.row_log_sum = row_log_sum.data_ptr();
  args.image_norm = nf.data_ptr();
  args.text_norm = nt.data_ptr();
  args.B = B;
  args.K = K;
  args.E = E;
  args.W = W.data_ptr<double>();
  args.row_part = row_part.data_ptr<double>();
  args.col_part = col_part.data_ptr<double>();
  args.grad_image = grad_f.data_ptr();
  args.grad_text = grad_t.data_ptr();
  args.grad_scale = grad_s.data_ptr();
  cuda::check_launch(cuda::launch_subset_ce_backward(args, c10::cuda::getCurrentCUDAStream()), op);
  return {grad_f.to(image_features.scalar_type()), grad_t.to(text_features.scalar_type()),
          grad_s.reshape(scale.sizes()).to(scale.scalar_type())};
}

uint32_t subset_ce_cuda_error_flags(int64_t device, bool reset) {
  return cuda::read_error_word(&cuda::read_subset_ce_flags, device, reset);
}

}  // namespace skipkernels
