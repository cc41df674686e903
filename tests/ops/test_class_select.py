"""class_select: the reference against an independent brute-force oracle, and the compiled op
(torch.ops.skipkernels.class_select) against the reference, bit for bit."""
import math

import pytest
import torch
import torch.nn.functional as F

from skipkernels import _ext
from skipkernels.ops import class_select as cs
from skipkernels.ops.class_select import class_select_reference, draw_rank_mask

compiled = pytest.mark.skipif("class_select" not in _ext.COMPILED_OPS,
                              reason=f"compiled class_select not built: {_ext.load_error}")

BATCHES = (1, 3, 4, 32)
CLASSES = (2, 10, 100, 1000)


def brute_force(features, prototypes, labels, rank_mask, top_k):
    """The selection rule written out with Python lists: scores, forced labels, a (score desc,
    index asc) sort, the rank mask, labels kept, ascending order, positions."""
    scores = (features.double() @ prototypes.double().T).amax(0).tolist()
    label_list = labels.tolist()
    for y in label_list:
        scores[y] = math.inf
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
    mask = rank_mask.tolist()
    keep = set(order[:top_k]) | {order[top_k + j] for j, m in enumerate(mask) if m} | set(label_list)
    selected = sorted(keep)
    position = {c: i for i, c in enumerate(selected)}
    return selected, [position[y] for y in label_list]


def make_case(batch, classes, top_k, seed, dtype=torch.float32, same_class=False, lam=0.3):
    gen = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(batch, 24, generator=gen), dim=-1).to(dtype)
    prototypes = F.normalize(torch.randn(classes, 24, generator=gen), dim=-1).to(dtype)
    if same_class:
        labels = torch.full((batch,), int(torch.randint(classes, (1,), generator=gen)))
    else:
        labels = torch.randint(classes, (batch,), generator=gen)  # duplicates are likely
    rank_mask = draw_rank_mask(classes, top_k, lam, gen)
    return features, prototypes, labels, rank_mask


def top_k_choices(classes):
    return sorted({1, max(1, classes // 3), classes})


CASES = [(b, c, k) for b in BATCHES for c in CLASSES for k in top_k_choices(c)]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("batch,classes,top_k", CASES)
def test_reference_matches_brute_force(batch, classes, top_k):
    for seed, same in ((batch * 1000 + classes + top_k, False), (7, True)):
        features, prototypes, labels, rank_mask = make_case(batch, classes, top_k, seed, same_class=same)
        selected, remapped = class_select_reference(features, prototypes, labels, rank_mask, top_k)
        expected_selected, expected_remapped = brute_force(features, prototypes, labels, rank_mask, top_k)
        assert selected.tolist() == expected_selected
        assert remapped.tolist() == expected_remapped
        assert selected.dtype == remapped.dtype == torch.int64
        assert torch.equal(selected[remapped], labels)  # every label maps back to itself


@pytest.mark.parametrize("classes", CLASSES)
def test_reference_size_is_static_when_labels_fit_in_top_k(classes):
    top_k = max(1, classes // 2)
    gen = torch.Generator().manual_seed(classes)
    rank_mask = draw_rank_mask(classes, top_k, 0.3, gen)
    size = top_k + int(rank_mask.sum())
    for seed in range(5):
        batch = min(4, top_k)
        features, prototypes, labels, _ = make_case(batch, classes, top_k, seed)
        selected, _ = class_select_reference(features, prototypes, labels, rank_mask, top_k, num_selected=size)
        assert selected.numel() == size


def test_reference_ties_go_to_the_smaller_class_index():
    # Integer-valued inputs make the fp64 scores exact, so duplicated prototypes tie exactly.
    gen = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (6, 8), generator=gen).float()
    prototypes = torch.cat([base, base, base])  # classes c, c + 6, c + 12 tie
    features = torch.randint(-3, 4, (3, 8), generator=gen).float()
    labels = torch.tensor([17, 17, 17])
    rank_mask = torch.zeros(18 - 5, dtype=torch.bool)
    selected, remapped = class_select_reference(features, prototypes, labels, rank_mask, 5)
    assert selected.tolist() == brute_force(features, prototypes, labels, rank_mask, 5)[0]
    scores = (features.double() @ prototypes.double().T).amax(0)
    kept = [c for c in selected.tolist() if c != 17]
    for c in kept:  # a tying class with a smaller index is kept as well
        for twin in (c - 6, c - 12):
            if twin >= 0 and scores[twin] == scores[c]:
                assert twin in kept
    assert remapped.tolist() == [len(selected) - 1] * 3


def _valid_args(**changes):
    """A valid class_select call (B=2, C=10, K=2), with ``changes`` applied."""
    gen = torch.Generator().manual_seed(0)
    args = dict(image_features=torch.randn(2, 6, generator=gen), prototypes=torch.randn(10, 6, generator=gen),
                labels=torch.tensor([1, 2]), rank_mask=torch.ones(8, dtype=torch.bool), top_k=2,
                num_selected=-1)
    args.update(changes)
    return args


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=torch.tensor([0, 10])), ValueError, "labels must lie in"),
    (dict(labels=torch.tensor([-1, 0])), ValueError, "labels must lie in"),
    (dict(top_k=0), ValueError, "top_k must be in"),
    (dict(top_k=11), ValueError, "top_k must be in"),
    (dict(prototypes=torch.randn(10, 5)), ValueError, "feature width mismatch"),
    (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels must be an integer"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, r"labels must be \(B,\)"),
    (dict(rank_mask=torch.zeros(7, dtype=torch.bool)), ValueError, "rank_mask must be bool"),
    (dict(rank_mask=torch.zeros(8)), ValueError, "rank_mask must be bool"),
    (dict(num_selected=3), ValueError, "num_selected"),
])
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=compiled)])
def test_bad_input_raises_clearly(kwargs, error, match, backend):
    args = _valid_args(**kwargs)
    with pytest.raises(error, match=match):
        cs.class_select(**args, backend=backend)


# ----------------------------------------------------------------------------- compiled


@compiled
@pytest.mark.parametrize("batch,classes,top_k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compiled_equals_reference(batch, classes, top_k, dtype):
    for seed, same in ((batch + 31 * classes + top_k, False), (11, True)):
        features, prototypes, labels, rank_mask = make_case(batch, classes, top_k, seed, dtype, same)
        expected = class_select_reference(features, prototypes, labels, rank_mask, top_k)
        got = torch.ops.skipkernels.class_select(features, prototypes, labels, rank_mask, top_k, -1)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert got[0].dtype == got[1].dtype == torch.int64
        declared = torch.ops.skipkernels.class_select(features, prototypes, labels, rank_mask, top_k,
                                                      expected[0].numel())
        assert torch.equal(declared[0], expected[0]) and torch.equal(declared[1], expected[1])


@compiled
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_other_dtypes_and_int32_labels(dtype):
    features, prototypes, labels, rank_mask = make_case(4, 100, 10, 5, dtype)
    expected = class_select_reference(features, prototypes, labels, rank_mask, 10)
    got = torch.ops.skipkernels.class_select(features, prototypes, labels.int(), rank_mask, 10, -1)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@compiled
def test_compiled_non_contiguous_inputs():
    features, prototypes, labels, rank_mask = make_case(4, 100, 10, 6)
    f_t = features.T.contiguous().T  # same values, column-major
    p_wide = torch.cat([prototypes, prototypes], 1)[:, ::2]  # strided view
    p_wide.copy_(prototypes)
    labels_strided = torch.stack([labels, labels], 1)[:, 0]
    expected = class_select_reference(features, prototypes, labels, rank_mask, 10)
    got = torch.ops.skipkernels.class_select(f_t, p_wide, labels_strided, rank_mask, 10, -1)
    assert not f_t.is_contiguous() and not p_wide.is_contiguous() and not labels_strided.is_contiguous()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@compiled
def test_compiled_exact_ties_and_nan_scores():
    gen = torch.Generator().manual_seed(4)
    base = torch.randint(-3, 4, (20, 8), generator=gen).float()
    prototypes = torch.cat([base, base, base, base])
    features = torch.randint(-3, 4, (4, 8), generator=gen).float()
    labels = torch.tensor([3, 3, 50, 79])
    for top_k in (1, 7, 30, 80):
        rank_mask = draw_rank_mask(80, top_k, 0.5, gen)
        expected = class_select_reference(features, prototypes, labels, rank_mask, top_k)
        got = torch.ops.skipkernels.class_select(features, prototypes, labels, rank_mask, top_k, -1)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # A NaN prototype ranks last in the reference (torch.sort puts NaN after every number).
    prototypes[5, 0] = float("nan")
    rank_mask = torch.zeros(80 - 10, dtype=torch.bool)
    rank_mask[-1] = True
    expected = class_select_reference(features, prototypes, labels, rank_mask, 10)
    got = torch.ops.skipkernels.class_select(features, prototypes, labels, rank_mask, 10, -1)
    assert 5 in expected[0].tolist()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@compiled
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(labels=torch.tensor([0, 10])), ValueError, "labels must lie in"),
    (dict(top_k=0), ValueError, "top_k must be in"),
    (dict(top_k=11), ValueError, "top_k must be in"),
    (dict(prototypes=torch.randn(10, 5)), ValueError, "feature width mismatch"),
    (dict(image_features=torch.randn(0, 6)), ValueError, "at least one image"),
    (dict(image_features=torch.randint(0, 3, (2, 6))), TypeError, "must be float32"),
    (dict(labels=torch.tensor([0.0, 1.0])), TypeError, "labels must be an int64"),
    (dict(rank_mask=torch.zeros(8)), ValueError, "rank_mask must be bool"),
    (dict(num_selected=3), ValueError, "declared num_selected=3"),
    (dict(num_selected=11), ValueError, "num_selected must be -1"),
])
def test_compiled_op_bad_input_raises_clearly(kwargs, error, match):
    args = _valid_args(**kwargs)
    with pytest.raises(error, match=match):
        torch.ops.skipkernels.class_select(*args.values())


@compiled
def test_compiled_is_used_by_auto_dispatch_and_agrees():
    features, prototypes, labels, rank_mask = make_case(3, 10, 4, 2)
    got = cs.class_select(features, prototypes, labels, rank_mask, 4, backend="auto")
    expected = class_select_reference(features, prototypes, labels, rank_mask, 4)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="does not run on cpu"):
        cs.class_select(features, prototypes, labels, rank_mask, 4, backend="cuda")


@compiled
def test_compiled_under_torch_compile_with_declared_size():
    features, prototypes, labels, rank_mask = make_case(4, 100, 20, 9)
    size = class_select_reference(features, prototypes, labels, rank_mask, 20)[0].numel()

    def step(f, p, y, m):
        selected, remapped = torch.ops.skipkernels.class_select(f, p, y, m, 20, size)
        return p[selected].sum(1), remapped + 1

    eager = step(features, prototypes, labels, rank_mask)
    traced = torch.compile(step, fullgraph=True, backend="aot_eager")(features, prototypes, labels, rank_mask)
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    # Fake (meta) tensors: declared size, (B,) remapped.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (features, prototypes, labels, rank_mask)]
        selected, remapped = torch.ops.skipkernels.class_select(*fake, 20, size)
    assert selected.shape == (size,) and remapped.shape == (4,) and selected.dtype == torch.int64


@compiled
def test_compiled_opcheck():
    features, prototypes, labels, rank_mask = make_case(4, 50, 10, 1)
    size = class_select_reference(features, prototypes, labels, rank_mask, 10)[0].numel()
    torch.library.opcheck(torch.ops.skipkernels.class_select.default,
                          (features, prototypes, labels, rank_mask, 10, size))
