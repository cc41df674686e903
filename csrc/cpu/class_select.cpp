// CSkip class selection on the CPU (semantics: skipkernels/ops/class_select.py).
//
// Scores are computed with the same fp64 matrix product the reference uses, so on the CPU the
// ranking is bit-for-bit the reference's; the max over the batch, label forcing, ranking, masking,
// compaction and remapping then run in one pass over C without temporaries of size C*B beyond
// that product.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "skipkernels.h"

namespace skipkernels {

namespace {

// Order of torch.sort(-scores, stable=True): larger scores first, NaN last, ties by class index.
inline bool ranks_before(double a, int64_t ia, double b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return nb;
  if (na) return ia < ib;
  if (a != b) return a > b;
  return ia < ib;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> class_select_cpu(const at::Tensor& image_features,
                                                    const at::Tensor& prototypes,
                                                    const at::Tensor& labels_in,
                                                    const at::Tensor& rank_mask_in, int64_t top_k,
                                                    int64_t num_selected) {
  check_class_select_inputs(image_features, prototypes, labels_in, rank_mask_in, top_k,
                            num_selected);
  const int64_t B = image_features.size(0);
  const int64_t C = prototypes.size(0);

  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(label_ptr[b] >= 0 && label_ptr[b] < C, "class_select: labels must lie in [0, ",
                      C, "), got ", label_ptr[b], " at position ", b);
  }
  const at::Tensor rank_mask = rank_mask_in.contiguous();
  const bool* mask_ptr = rank_mask.data_ptr<bool>();

  // (B, C) fp64 scores, exactly as the reference forms them.
  const at::Tensor dots =
      at::mm(image_features.to(at::kDouble), prototypes.to(at::kDouble).t()).contiguous();
  const double* dot_ptr = dots.data_ptr<double>();

  std::vector<double> score(C);
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double m = dot_ptr[c];
      for (int64_t b = 1; b < B; ++b) {
        const double v = dot_ptr[b * C + c];
        if (std::isnan(v) || v > m) m = v;  // amax propagates NaN
        if (std::isnan(m)) break;
      }
      score[c] = m;
    }
  });
  std::vector<char> is_label(C, 0);
  for (int64_t b = 0; b < B; ++b) {
    score[label_ptr[b]] = std::numeric_limits<double>::infinity();
    is_label[label_ptr[b]] = 1;
  }

  std::vector<int64_t> order(C);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return ranks_before(score[a], a, score[b], b);
  });

  std::vector<char> keep(C, 0);
  for (int64_t r = 0; r < C; ++r) {
    keep[order[r]] = (r < top_k || mask_ptr[r - top_k]) ? 1 : 0;
  }
  // Labels are always kept (the reference's silent remap of a dropped label to 0 is impossible).
  for (int64_t c = 0; c < C; ++c) keep[c] |= is_label[c];

  std::vector<int64_t> position(C);
  int64_t count = 0;
  for (int64_t c = 0; c < C; ++c) {
    position[c] = count;
    count += keep[c];
  }
  TORCH_CHECK_VALUE(num_selected < 0 || count == num_selected, "class_select: declared num_selected=",
                    num_selected, " but the selection has ", count,
                    " classes (more distinct batch labels than top_k?)");

  at::Tensor selected = at::empty({count}, labels.options());
  int64_t* sel_ptr = selected.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    if (keep[c]) sel_ptr[position[c]] = c;
  }
  at::Tensor remapped = at::empty({B}, labels.options());
  int64_t* rem_ptr = remapped.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) rem_ptr[b] = position[label_ptr[b]];
  return {selected, remapped};
}

}  // namespace skipkernels
