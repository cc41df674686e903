// Native tests of the CPU kernels against libtorch (built and run by CMake/ctest, see
// CMakeLists.txt). The Python tests are the main suite; these check the kernels without Python:
// a hand-worked selection, the loss and its gradients against ATen in float64, and errors.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>

#include "skipkernels.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool throws_value_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const c10::ValueError& err) {
    return std::string(err.what()).find(needle) != std::string::npos;
  } catch (...) {
    return false;
  }
  return false;
}

void test_class_select_by_hand() {
  // Scores (max over the two images): class 0: 1, 1: 3, 2: 2, 3: 3 (tie with 1), 4: -1.
  const at::Tensor f = at::tensor({1.0, 0.0, 0.0, 1.0}, at::kDouble).reshape({2, 2});
  const at::Tensor t = at::tensor({1.0, 0.0, 3.0, -5.0, 2.0, 0.0, -4.0, 3.0, -1.0, -1.0}, at::kDouble)
                           .reshape({5, 2});
  const at::Tensor labels = at::tensor({4}, at::kLong).expand({2}).contiguous();
  // Ranks: 4 (label, +inf), 1, 3 (tie broken by index), 2, 0. K = 2 keeps {4, 1};
  // rank_mask over ranks 2..4 keeps rank 3 (class 2).
  const at::Tensor mask = at::tensor({0, 1, 0}, at::kLong).to(at::kBool);
  auto [selected, remapped] = skipkernels::class_select_cpu(f, t, labels, mask, 2, -1);
  expect(at::equal(selected, at::tensor({1, 2, 4}, at::kLong)), "class_select: selected set");
  expect(at::equal(remapped, at::tensor({2, 2}, at::kLong)), "class_select: remapped labels");
  expect(throws_value_error([&] { skipkernels::class_select_cpu(f, t, labels, mask, 2, 4); },
                            "num_selected"),
         "class_select: wrong num_selected raises");
  const at::Tensor bad = at::tensor({0, 5}, at::kLong);
  expect(throws_value_error([&] { skipkernels::class_select_cpu(f, t, bad, mask, 2, -1); },
                            "labels must lie in"),
         "class_select: out-of-range label raises");
}

void test_subset_ce_against_aten() {
  at::manual_seed(0);
  const int64_t B = 5, K = 7, E = 9;
  const at::Tensor f = at::randn({B, E}, at::kDouble);
  const at::Tensor t = at::randn({K, E}, at::kDouble);
  const at::Tensor scale = at::full({}, 3.5, at::kDouble);
  const at::Tensor labels = at::tensor({0, 6, 6, 2, 3}, at::kLong);
  auto [loss, cos, row_max, row_log_sum, nf, nt] = skipkernels::subset_logits_ce_cpu(f, t, scale, labels);

  const at::Tensor fh = f / f.norm(2, {1}, true);
  const at::Tensor th = t / t.norm(2, {1}, true);
  const at::Tensor logits = scale * at::mm(fh, th.t());
  const at::Tensor ref = at::cross_entropy_loss(logits, labels);
  expect(at::allclose(loss, ref, 1e-12, 1e-12), "subset_logits_ce: loss matches ATen");
  expect(at::allclose(cos, at::mm(fh, th.t()), 1e-12, 1e-12), "subset_logits_ce: cos");

  // Gradients against central differences of the reference loss.
  const at::Tensor one = at::ones({}, at::kDouble);
  auto [gf, gt, gs] = skipkernels::subset_logits_ce_backward_cpu(one, std::nullopt, f, t, scale,
                                                                 labels, cos, row_max, row_log_sum,
                                                                 nf, nt);
  auto ref_loss = [&](const at::Tensor& ff, const at::Tensor& tt, const at::Tensor& ss) {
    const at::Tensor a = ff / ff.norm(2, {1}, true);
    const at::Tensor b = tt / tt.norm(2, {1}, true);
    return at::cross_entropy_loss(ss * at::mm(a, b.t()), labels).item<double>();
  };
  const double h = 1e-6;
  double worst = 0;
  for (int64_t i = 0; i < B * E; i += 4) {
    at::Tensor fp = f.clone(), fm = f.clone();
    fp.view(-1)[i] += h;
    fm.view(-1)[i] -= h;
    const double num = (ref_loss(fp, t, scale) - ref_loss(fm, t, scale)) / (2 * h);
    worst = std::max(worst, std::abs(num - gf.view(-1)[i].item<double>()));
  }
  for (int64_t i = 0; i < K * E; i += 4) {
    at::Tensor tp = t.clone(), tm = t.clone();
    tp.view(-1)[i] += h;
    tm.view(-1)[i] -= h;
    const double num = (ref_loss(f, tp, scale) - ref_loss(f, tm, scale)) / (2 * h);
    worst = std::max(worst, std::abs(num - gt.view(-1)[i].item<double>()));
  }
  const double num_s = (ref_loss(f, t, scale + h) - ref_loss(f, t, scale - h)) / (2 * h);
  worst = std::max(worst, std::abs(num_s - gs.item<double>()));
  expect(worst < 1e-7, "subset_logits_ce_backward: gradients match finite differences (max err " +
                           std::to_string(worst) + ")");

  const at::Tensor bad = at::tensor({0, 7, 1, 1, 1}, at::kLong);
  expect(throws_value_error([&] { skipkernels::subset_logits_ce_cpu(f, t, scale, bad); },
                            "labels must lie in"),
         "subset_logits_ce: out-of-range label raises");
  expect(throws_value_error(
             [&] { skipkernels::subset_logits_ce_cpu(f, at::randn({K, E + 1}, at::kDouble), scale, labels); },
             "feature width mismatch"),
         "subset_logits_ce: width mismatch raises");
}

}  // namespace

int main() {
  test_class_select_by_hand();
  test_subset_ce_against_aten();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
