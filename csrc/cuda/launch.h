// Launch functions of the CUDA kernels (cuda/*.cu), called by the host wrappers
// (cuda/*_host.cpp).
//
// The split is deliberate: everything that can throw (argument checks, allocations, the host
// read-back, TORCH_CHECK) is compiled by the C++ compiler in the host wrappers, and the .cu files
// only export these launchers, which never throw and report the CUDA error of their launches. A
// c10 exception thrown from nvcc-compiled host code killed the process (segmentation fault)
// instead of reaching Python as a ValueError.
//
// Pointers are device pointers to contiguous tensors; the host wrapper has checked every shape.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace skipkernels {
namespace cuda {

// Element type of the feature tensors (the accumulation type is float, or double for kFloat64).
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct ClassSelectLaunch {
  Dtype dtype;
  const void* image_features;  // (B, E)
  const void* prototypes;      // (C, E), same dtype
  const int64_t* labels;       // (B,)
  const bool* rank_mask;       // (C - top_k,)
  int64_t B, C, E, top_k;
  int64_t capacity;  // entries of `selected`: num_selected, or C for the dynamic size
  bool strict;       // num_selected was declared: flag a size mismatch in the error word
  int splits;        // batch splits of the score kernel; `partial` holds splits * C doubles
  // workspace and outputs
  int* is_label;            // (C,), zeroed by the launcher
  int64_t* clamped_labels;  // (B,)
  double* partial;          // (splits, C)
  int* keep;                // (C,)
  int* position;            // (C,)
  int64_t* selected;        // (capacity,)
  int64_t* remapped;        // (B,)
  int64_t* info;  // dynamic size only: info[0] = selection size, info[1] = error bits; else null
};

// Number of batch splits the score kernel of class_select uses for B rows.
int class_select_splits(int64_t B) noexcept;

cudaError_t launch_class_select(const ClassSelectLaunch& args, cudaStream_t stream) noexcept;

struct SubsetCeForwardLaunch {
  Dtype dtype;
  const void* image_features;  // (B, E)
  const void* text_features;   // (K, E), same dtype
  const void* scale;           // (1,) in the accumulation type
  const int64_t* labels;       // (B,)
  int64_t B, K, E;
  int col_blocks;  // see subset_ce_forward_col_blocks
  // workspace and outputs, in the accumulation type
  void* cos;          // (B, K)
  void* row_max;      // (B,)
  void* row_log_sum;  // (B,)
  void* image_norm;   // (B,)
  void* text_norm;    // (K,)
  void* loss;         // ()
  void* partial;      // (B, col_blocks, 2)
};

int subset_ce_forward_col_blocks(int64_t K) noexcept;
int subset_ce_forward_row_blocks(int64_t B) noexcept;

cudaError_t launch_subset_ce_forward(const SubsetCeForwardLaunch& args, cudaStream_t stream) noexcept;

struct SubsetCeBackwardLaunch {
  Dtype dtype;
  const void* grad_loss;    // (1,) accumulation type
  const void* grad_logits;  // (B, K) accumulation type, or null
  const void* image_features;
  const void* text_features;
  const void* scale;        // (1,) accumulation type
  const int64_t* labels;
  const void* cos;          // saved tensors, accumulation type
  const void* row_max;
  const void* row_log_sum;
  const void* image_norm;
  const void* text_norm;
  int64_t B, K, E;
  // workspace (double: the backward's sums and products are formed in double, see subset_ce.cu)
  double* W;         // (B, K)
  double* row_part;  // (B, subset_ce_backward_grid(...).dz_col_blocks)
  double* col_part;  // (dz_row_blocks, K)
  // outputs
  void* grad_image;  // (B, E) feature dtype
  void* grad_text;   // (K, E) feature dtype
  void* grad_scale;  // () accumulation type
};

struct SubsetCeBackwardGrid {
  int dz_col_blocks, dz_row_blocks, f_row_blocks, t_row_blocks;
};

SubsetCeBackwardGrid subset_ce_backward_grid(int64_t B, int64_t K) noexcept;

cudaError_t launch_subset_ce_backward(const SubsetCeBackwardLaunch& args, cudaStream_t stream) noexcept;

// Device-side error words (bits: CudaErrorBits in skipkernels.h). Synchronise the device, read
// the word into *value and clear it when `reset`.
cudaError_t read_class_select_flags(unsigned int* value, bool reset) noexcept;
cudaError_t read_subset_ce_flags(unsigned int* value, bool reset) noexcept;

// Largest grid.y the launchers accept (CUDA's limit).
constexpr int64_t kMaxGridY = 65535;

}  // namespace cuda
}  // namespace skipkernels
