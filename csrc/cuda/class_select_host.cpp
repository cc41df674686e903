// Host side of the CUDA class selection (kernels: class_select.cu): checks, allocations, the
// launch and, for the dynamic size, the one read-back. Compiled by the C++ compiler so that every
// error raised here reaches Python as an exception (see cuda/launch.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/host_common.h"
#include "skipkernels.h"

namespace skipkernels {

std::tuple<at::Tensor, at::Tensor> class_select_cuda(const at::Tensor& image_features,
                                                     const at::Tensor& prototypes,
                                                     const at::Tensor& labels_in,
                                                     const at::Tensor& rank_mask_in, int64_t top_k,
                                                     int64_t num_selected) {
  const char* op = "class_select";
  check_class_select_inputs(image_features, prototypes, labels_in, rank_mask_in, top_k,
                            num_selected);
  cuda::check_cuda_inputs({&image_features, &prototypes, &labels_in, &rank_mask_in}, op);
  const c10::cuda::CUDAGuard guard(image_features.device());

  // upcasts are exact, so the fp64 scores are unchanged
  const auto [f, t] =
      cuda::common_features(image_features, prototypes, compute_dtype(image_features, prototypes));
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor rank_mask = rank_mask_in.contiguous();
  const int64_t B = f.size(0), C = t.size(0), E = f.size(1);
  TORCH_CHECK_VALUE(C < (int64_t{1} << 31), op, ": too many classes (", C, ")");
  const auto long_opts = labels.options();
  const auto int_opts = labels.options().dtype(at::kInt);

  const bool dynamic = num_selected < 0;
  cuda::ClassSelectLaunch args{};
  args.dtype = cuda::launch_dtype(f.scalar_type());
  args.B = B;
  args.C = C;
  args.E = E;
  args.top_k = top_k;
  args.capacity = dynamic ? C : num_selected;
  args.strict = !dynamic;
  args.splits = cuda::class_select_splits(B);
  // Dynamic size: a local error word read back with the size; declared size: the device's word.
  at::Tensor info = dynamic ? at::empty({2}, long_opts) : at::Tensor();
  at::Tensor is_label = at::empty({C}, int_opts);
  at::Tensor clamped = at::empty({B}, long_opts);
  at::Tensor partial = at::empty({args.splits, C}, f.options().dtype(at::kDouble));
  at::Tensor keep = at::empty({C}, int_opts);
  at::Tensor position = at::empty({C}, int_opts);
  at::Tensor selected = at::empty({args.capacity}, long_opts);
  at::Tensor remapped = at::empty({B}, long_opts);
  args.image_features = f.data_ptr();
  args.prototypes = t.data_ptr();
  args.labels = labels.data_ptr<int64_t>();
  args.rank_mask = rank_mask.data_ptr<bool>();
  args.is_label = is_label.data_ptr<int>();
  args.clamped_labels = clamped.data_ptr<int64_t>();
  args.partial = partial.data_ptr<double>();
  args.keep = keep.data_ptr<int>();
  args.position = position.data_ptr<int>();
  args.selected = selected.data_ptr<int64_t>();
  args.remapped = remapped.data_ptr<int64_t>();
  args.info = dynamic ? info.data_ptr<int64_t>() : nullptr;
  cuda::check_launch(cuda::launch_class_select(args, c10::cuda::getCurrentCUDAStream()), op);

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
  return cuda::read_error_word(&cuda::read_class_select_flags, device, reset);
}

}  // namespace skipkernels
