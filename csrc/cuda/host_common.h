// Shared by the host wrappers of the CUDA ops (cuda/*_host.cpp, compiled by the C++ compiler):
// the device checks and the conversions to the launchers' plain arguments (cuda/launch.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>
#include <utility>

#include "cuda/launch.h"

namespace skipkernels {
namespace cuda {

inline void check_cuda_inputs(std::initializer_list<const at::Tensor*> tensors, const char* op) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK_VALUE(t->is_cuda(), op, ": the CUDA kernel got a tensor on ", t->device(),
                      "; move all inputs to one CUDA device");
  }
}

inline Dtype launch_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kDouble: return Dtype::kFloat64;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "skipkernels CUDA ops: unsupported dtype ", type);
  return Dtype::kFloat32;
}

// Features in one dtype (mixed inputs run in `common`, the accumulation type; upcasts are exact),
// contiguous.
inline std::pair<at::Tensor, at::Tensor> common_features(const at::Tensor& image,
                                                         const at::Tensor& text,
                                                         at::ScalarType common) {
  at::Tensor f = image, t = text;
  if (f.scalar_type() != t.scalar_type()) {
    f = f.to(common);
    t = t.to(common);
  }
  return {f.contiguous(), t.contiguous()};
}

// Raise (from C++-compiled code) the error a launcher returned.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// One device-side error word, read (and cleared when `reset`) with its launcher-side reader.
inline uint32_t read_error_word(cudaError_t (*reader)(unsigned int*, bool), int64_t device, bool reset) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  unsigned int value = 0;
  C10_CUDA_CHECK(reader(&value, reset));
  return value;
}

}  // namespace cuda
}  // namespace skipkernels
