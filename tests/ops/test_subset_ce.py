"""subset_logits_ce and class_scores_topk: the references against float64 oracles, and the
compiled ops (torch.ops.skipkernels.*) against both: a compiled result's error vs float64 must be
at most twice the reference's own error in the same dtype."""
import pytest
import torch
import torch.nn.functional as F

from skipkernels import _ext
from skipkernels.ops import subset_ce
from skipkernels.ops.subset_ce import (class_scores_topk_chunked, class_scores_topk_reference,
                                       subset_logits_ce_reference)

compiled = pytest.mark.skipif("subset_logits_ce" not in _ext.COMPILED_OPS,
                              reason=f"compiled subset_logits_ce not built: {_ext.load_error}")

# (B, K', E): K' from 1 to 1000, odd widths included.
SHAPES = [(1, 1, 8), (3, 2, 16), (4, 10, 33), (1, 100, 24), (32, 100, 64), (4, 1000, 64), (32, 37, 128)]


def make_case(batch, classes, width, seed, dtype=torch.float32, same_class=False):
    gen = torch.Generator().manual_seed(seed)
    # Un-normalised, with row norms far from 1 so the normalisation matters.
    f = (torch.randn(batch, width, generator=gen) * (0.5 + 3 * torch.rand(batch, 1, generator=gen))).to(dtype)
    t = (torch.randn(classes, width, generator=gen) * (0.5 + 3 * torch.rand(classes, 1, generator=gen))).to(dtype)
    scale = torch.tensor(10 + 90 * torch.rand((), generator=gen).item())
    if same_class:
        labels = torch.full((batch,), int(torch.randint(classes, (1,), generator=gen)))
    else:
        labels = torch.randint(classes, (batch,), generator=gen)
    return f, t, scale, labels


def oracle_loss(f, t, scale, labels, return_logits=False):
    """The reference's formula in float64."""
    logits = scale.double() * (F.normalize(f.double(), dim=-1) @ F.normalize(t.double(), dim=-1).T)
    loss = F.cross_entropy(logits, labels.long())
    return (loss, logits) if return_logits else loss


def max_err(x, exact):
    return (x.detach().double() - exact.detach().double()).abs().max().item()


def ulp_floor(exact, dtype=torch.float32):
    """One ulp (of the output dtype) of the largest value: a reference exact by luck is no trap."""
    return torch.finfo(dtype).eps * max(1.0, exact.detach().abs().max().item())


def assert_at_most_twice_reference_error(got, ref, exact, what):
    err, ref_err = max_err(got, exact), max_err(ref, exact)
    floor = ulp_floor(exact, got.dtype)
    assert err <= 2 * ref_err + floor, f"{what}: error {err:.3e} vs the reference's {ref_err:.3e}"


def assert_mean_error_at_most_twice_reference(cases, what):
    """cases: (got, ref, exact) triples of one quantity over several random draws. The max error of
    a single draw is partly luck (either side can land on the exact value), so the errors are
    averaged over draws before the factor 2 is applied."""
    err = sum(max_err(g, e) for g, _, e in cases) / len(cases)
    ref_err = sum(max_err(r, e) for _, r, e in cases) / len(cases)
    floor = sum(ulp_floor(e, g.dtype) for g, _, e in cases) / len(cases)
    assert err <= 2 * ref_err + floor, f"{what}: mean error {err:.3e} vs the reference's {ref_err:.3e}"


def grads_of(fn, f, t, scale, labels, weight=None):
    f = f.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    if weight is None:
        loss = fn(f, t, scale, labels)
        total = loss
    else:  # use the logits too, so their gradient path is exercised
        loss, logits = fn(f, t, scale, labels, True)
        total = loss + (logits * weight.to(logits.dtype)).sum()
    total.backward()
    return loss, f.grad, t.grad, scale.grad


def compiled_fn(f, t, scale, labels, return_logits=False):
    return subset_ce.subset_logits_ce(f, t, scale, labels, return_logits, backend="cpu")


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("batch,classes,width", SHAPES)
def test_reference_matches_float64_formula(batch, classes, width):
    f, t, scale, labels = make_case(batch, classes, width, seed=batch + classes)
    loss, logits = subset_logits_ce_reference(f, t, scale, labels, return_logits=True)
    exact_loss, exact_logits = oracle_loss(f, t, scale, labels, True)
    assert loss.dtype == logits.dtype == torch.float32 and logits.shape == (batch, classes)
    torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.double(), exact_logits, rtol=1e-5, atol=1e-4)
    # Cross-entropy written out: mean of logsumexp minus the target logit.
    manual = (torch.logsumexp(exact_logits, 1) - exact_logits[torch.arange(batch), labels]).mean()
    torch.testing.assert_close(exact_loss, manual)


@pytest.mark.parametrize("chunk", [1, 7, 64, 5000])
@pytest.mark.parametrize("batch,classes,width", [(1, 1, 8), (3, 10, 16), (32, 1000, 64)])
def test_reference_chunked_topk_matches_full(batch, classes, width, chunk):
    f, t, scale, labels = make_case(batch, classes, width, seed=classes + chunk)
    for k in (1, 5, classes + 3):
        values, indices, loss = class_scores_topk_chunked(f, t, scale, k, labels, chunk)
        full_values, full_indices, full_loss = class_scores_topk_reference(f, t, scale, k, labels)
        assert values.shape == (batch, min(k, classes))
        torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-5)
        # Indices agree wherever the value is not tied within rounding with a neighbour.
        gaps = torch.diff(full_values, dim=1).abs()
        clear = torch.ones_like(full_indices, dtype=torch.bool)
        clear[:, 1:] &= gaps > 1e-4
        clear[:, :-1] &= gaps > 1e-4
        assert torch.equal(indices[clear], full_indices[clear])
    assert class_scores_topk_chunked(f, t, scale, 3, None, chunk)[2] is None


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=torch.tensor([0, 10])), ValueError, "labels must lie in"),
    (dict(labels=torch.tensor([-1, 0])), ValueError, "labels must lie in"),
    (dict(text_features=torch.randn(10, 5)), ValueError, "feature width mismatch"),
    (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels must be an integer"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must be \(B,\)"),
    (dict(image_features=torch.randn(2, 6, 1)), ValueError, r"expected image_features \(B, E\)"),
])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=compiled)])
def test_bad_input_raises_clearly(kwargs, error, match, backend):
    gen = torch.Generator().manual_seed(0)
    args = dict(image_features=torch.randn(2, 6, generator=gen), text_features=torch.randn(10, 6, generator=gen),
                scale=torch.tensor(10.0), labels=torch.tensor([1, 2]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        subset_ce.subset_logits_ce(**args, backend=backend)


# ----------------------------------------------------------------------------- compiled


@compiled
@pytest.mark.parametrize("batch,classes,width", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compiled_loss_and_grads_within_twice_reference_error(batch, classes, width, dtype):
    names = ("loss", "grad f", "grad t", "grad scale")
    cases = {name: [] for name in names}
    for seed in range(8):  # odd seeds: all-same-class batches
        f, t, scale, labels = make_case(batch, classes, width, 100 * seed + batch + classes, dtype, seed % 2 == 1)
        exact = grads_of(oracle_loss, f, t, scale, labels)
        ref = grads_of(subset_logits_ce_reference, f, t, scale, labels)
        got = grads_of(compiled_fn, f, t, scale, labels)
        assert got[0].dtype == torch.float32 and got[0].shape == ()
        assert got[1].dtype == f.dtype and got[2].dtype == t.dtype and got[3].dtype == scale.dtype
        for name, g, r, e in zip(names, got, ref, exact):
            assert max_err(g, e) <= 8 * max_err(r, e) + 8 * ulp_floor(e, g.dtype), f"{name}: far off in one draw"
            cases[name].append((g, r, e))
    for name in names:
        assert_mean_error_at_most_twice_reference(cases[name], f"{name} {dtype} {(batch, classes, width)}")


@compiled
@pytest.mark.parametrize("batch,classes,width", [(3, 10, 16), (32, 100, 64)])
def test_compiled_logits_output_and_its_gradient(batch, classes, width):
    names = ("loss", "grad f", "grad t", "grad scale", "logits")
    cases = {name: [] for name in names}
    for seed in range(6):
        f, t, scale, labels = make_case(batch, classes, width, seed=21 + seed)
        weight = torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed))
        exact = grads_of(oracle_loss, f, t, scale, labels, weight)
        ref = grads_of(subset_logits_ce_reference, f, t, scale, labels, weight)
        got = grads_of(compiled_fn, f, t, scale, labels, weight)
        logits = (compiled_fn(f, t, scale, labels, True)[1], subset_logits_ce_reference(f, t, scale, labels, True)[1],
                  oracle_loss(f, t, scale, labels, True)[1])
        for name, triple in zip(names, list(zip(got, ref, exact)) + [logits]):
            cases[name].append(triple)
    for name in names:
        assert_mean_error_at_most_twice_reference(cases[name], name)


@compiled
@pytest.mark.parametrize("return_logits", [False, True])
def test_compiled_gradcheck_float64(return_logits):
    from skipkernels.ops import _subset_ce_autograd
    f, t, scale, labels = make_case(3, 5, 7, seed=2, dtype=torch.float64)
    inputs = (f.requires_grad_(), t.requires_grad_(), scale.double().requires_grad_(), labels)
    assert torch.autograd.gradcheck(lambda a, b, s, y: _subset_ce_autograd.apply(a, b, s, y, return_logits),
                                    inputs, eps=1e-6, atol=1e-7)


@compiled
def test_compiled_float64_matches_float64_formula_with_zero_and_tiny_rows():
    # A zero row and one below the clamp (1e-12): F.normalize's gradient has no projection there.
    f, t, scale, labels = make_case(4, 6, 9, seed=8, dtype=torch.float64)
    f[0] = 0
    f[1] *= 1e-14
    t[2] *= 1e-14
    exact = grads_of(oracle_loss, f, t, scale.double(), labels)
    got = grads_of(compiled_fn, f, t, scale.double(), labels)
    for g, e in zip(got, exact):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@compiled
def test_compiled_bfloat16_mixed_dtypes_int32_labels_and_non_contiguous():
    f, t, scale, labels = make_case(4, 20, 32, seed=3)
    exact = grads_of(oracle_loss, f.bfloat16(), t.bfloat16(), scale, labels)
    ref = grads_of(subset_logits_ce_reference, f.bfloat16(), t.bfloat16(), scale, labels)
    got = grads_of(compiled_fn, f.bfloat16(), t.bfloat16(), scale, labels.int())
    for g, r, e in zip(got, ref, exact):  # bfloat16 rounding dominates both: one draw is enough
        assert_at_most_twice_reference_error(g, r, e, "bfloat16")
    # Mixed dtypes and strided views give the same values as their contiguous float32 copies.
    f_view = torch.cat([f, f], 1)[:, ::2]
    f_view.copy_(f)
    loss_mixed = compiled_fn(f_view, t.double(), scale, labels)
    loss_plain = compiled_fn(f.double(), t.double(), scale, labels)
    assert not f_view.is_contiguous()
    torch.testing.assert_close(loss_mixed, loss_plain)


@compiled
def test_compiled_is_deterministic():
    f, t, scale, labels = make_case(32, 100, 64, seed=12)
    first = grads_of(compiled_fn, f, t, scale, labels)
    second = grads_of(compiled_fn, f, t, scale, labels)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@compiled
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=torch.tensor([0, 10])), ValueError, "labels must lie in"),
    (dict(labels=torch.tensor([-1, 0])), ValueError, "labels must lie in"),
    (dict(text_features=torch.randn(10, 5)), ValueError, "feature width mismatch"),
    (dict(text_features=torch.randn(0, 6)), ValueError, "at least one class"),
    (dict(image_features=torch.randint(0, 3, (2, 6))), TypeError, "must be float32"),
    (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels must be an int64"),
    (dict(scale=torch.ones(2)), ValueError, "scale must hold one value"),
    (dict(scale=torch.tensor(1)), TypeError, "scale must be float32"),
])
def test_compiled_op_bad_input_raises_clearly(kwargs, error, match):
    gen = torch.Generator().manual_seed(0)
    args = dict(image_features=torch.randn(2, 6, generator=gen), text_features=torch.randn(10, 6, generator=gen),
                scale=torch.tensor(10.0), labels=torch.tensor([1, 2]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        torch.ops.skipkernels.subset_logits_ce(*args.values())


@compiled
def test_compiled_backward_checks_saved_tensors():
    f, t, scale, labels = make_case(3, 5, 8, seed=0)
    loss, cos, row_max, row_log_sum, nf, nt = torch.ops.skipkernels.subset_logits_ce(f, t, scale, labels)
    with pytest.raises(ValueError, match="saved tensors do not match"):
        torch.ops.skipkernels.subset_logits_ce_backward(torch.ones(()), None, f, t, scale, labels,
                                                        cos[:, :4], row_max, row_log_sum, nf, nt)
    with pytest.raises(ValueError, match="grad_logits must be"):
        torch.ops.skipkernels.subset_logits_ce_backward(torch.ones(()), torch.ones(3, 4), f, t, scale, labels,
                                                        cos, row_max, row_log_sum, nf, nt)


@compiled
def test_compiled_under_torch_compile():
    f, t, scale, labels = make_case(4, 10, 16, seed=6)

    def loss_fn(a, b, s, y):
        return subset_ce.subset_logits_ce(a, b, s, y, backend="cpu") * 2

    eager = grads_of(loss_fn, f, t, scale, labels)
    traced = grads_of(torch.compile(loss_fn, fullgraph=True), f, t, scale, labels)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)

    def raw(a, b, s, y):  # the op itself, outputs consumed by further ops
        loss, cos, row_max, row_log_sum, nf, nt = torch.ops.skipkernels.subset_logits_ce(a, b, s, y)
        return loss + cos.sum() + (row_max + row_log_sum).sum() + nf.sum() + nt.sum()

    torch.testing.assert_close(torch.compile(raw, fullgraph=True, backend="aot_eager")(f, t, scale, labels),
                               raw(f, t, scale, labels))


@compiled
def test_compiled_opcheck():
    f, t, scale, labels = make_case(3, 7, 8, seed=4)
    torch.library.opcheck(torch.ops.skipkernels.subset_logits_ce.default, (f, t, scale, labels))
    saved = torch.ops.skipkernels.subset_logits_ce(f, t, scale, labels)[1:]
    for grad_logits in (None, torch.randn(3, 7)):
        torch.library.opcheck(torch.ops.skipkernels.subset_logits_ce_backward.default,
                              (torch.ones(()), grad_logits, f, t, scale, labels, *saved))
    for k, y in ((3, labels), (100, None)):
        torch.library.opcheck(torch.ops.skipkernels.class_scores_topk.default, (f, t, scale, k, y, 2))


@compiled
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("batch,classes,width,dtype", [(1, 1, 8, torch.float32), (3, 10, 16, torch.float16),
                                                       (32, 1000, 64, torch.float32)])
def test_compiled_topk_matches_chunked_reference(batch, classes, width, dtype, chunk):
    f, t, scale, labels = make_case(batch, classes, width, seed=classes * chunk, dtype=dtype)
    for k, y in ((1, labels), (5, None), (classes + 2, labels)):
        got = subset_ce.class_scores_topk(f, t, scale, k, y, chunk, backend="cpu")
        expected = class_scores_topk_chunked(f, t, scale, k, y, chunk)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        if y is None:
            assert got[2] is None
        else:
            torch.testing.assert_close(got[2], expected[2])


@compiled
@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=torch.tensor([0, 10])), "labels must lie in"),
    (dict(k=-1), "k must be >= 0"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(text_features=torch.randn(10, 5)), "feature width mismatch"),
])
def test_compiled_topk_bad_input(kwargs, match):
    args = dict(image_features=torch.randn(2, 6), text_features=torch.randn(10, 6), scale=torch.tensor(10.0),
                k=3, labels=torch.tensor([1, 2]), chunk_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        torch.ops.skipkernels.class_scores_topk(*args.values())
