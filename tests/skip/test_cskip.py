import pytest
import torch
import torch.nn.functional as F

from skipkernels.ops.class_select import class_select_reference, draw_rank_mask, rank_keep_probs, top_k_for
from skipkernels.skip.cskip import ClassSkipper


def _skipper(num_classes=40, dim=16, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1)
    return ClassSkipper(prototypes, seed=seed, **kw), g


def test_top_k_rule():
    assert top_k_for(100, 0.5, 50) == 50
    assert top_k_for(100, 0.5, 20) == 20
    assert top_k_for(7, 0.5, 50) == 4      # ceil(3.5)
    assert top_k_for(10, 3, 50) == 3       # r > 1 is a count
    assert top_k_for(10, 30, 50) == 10
    assert top_k_for(10, 1.0, 5) == 10     # r = 1.0: every class, whatever max_top
    assert top_k_for(10, 2.5, 50) == 3     # a count is rounded up, as the authors' ceil
    assert top_k_for(100, 60, 50) == 50    # and capped by max_top
    with pytest.raises(ValueError, match="top_ratio"):
        top_k_for(10, 0.0, 5)


def test_rank_keep_probs_are_min_max_normalised_exponential():
    p = rank_keep_probs(11, 0.3)
    assert p[0] == 1 and p[-1] == 0
    assert torch.all(p[1:] <= p[:-1])
    x = torch.linspace(0, 5, 11, dtype=torch.float64)
    e = torch.exp(-x / 0.3)
    assert torch.allclose(p, (e - e.min()) / (e.max() - e.min()))
    assert rank_keep_probs(1, 0.3).tolist() == [1.0]  # the lone lower rank is the first (tests/skip/test_cskip_class_count.py)
    with pytest.raises(ValueError, match="lam"):
        rank_keep_probs(3, 0.0)


def test_labels_always_selected_and_remapped_to_the_same_class():
    skipper, g = _skipper(top_ratio=0.1, max_top=50, lam=0.3)
    for _ in range(20):
        feats = torch.randn(6, 16, generator=g)
        labels = torch.randint(0, 40, (6,), generator=g)
        selected, remapped = skipper.select(feats, labels)
        assert torch.all(selected[1:] > selected[:-1])  # sorted, unique
        assert torch.equal(selected[remapped], labels)
        assert set(labels.tolist()) <= set(selected.tolist())


def test_subset_size_follows_k_and_mask_and_is_static_under_the_fixed_mask():
    skipper, g = _skipper(top_ratio=0.25, max_top=50, lam=0.5)
    k = skipper.top_k
    assert k == 10
    expected = k + int(skipper.rank_mask.sum())
    sizes = set()
    for _ in range(15):
        labels = torch.randint(0, 40, (4,), generator=g)
        selected, _ = skipper.select(torch.randn(4, 16, generator=g), labels)
        sizes.add(len(selected))
    assert sizes == {expected}
    assert skipper.fixed_size == expected


def test_selection_keeps_the_top_ranked_classes():
    skipper, g = _skipper(num_classes=30, top_ratio=0.2, lam=0.3)
    feats = torch.randn(3, 16, generator=g)
    labels = torch.tensor([29, 29, 0])
    selected, _ = skipper.select(feats, labels)
    scores = (F.normalize(feats, dim=-1).double() @ skipper.prototypes.double().T).amax(0)
    scores[labels] = float("inf")
    top = torch.sort(-scores, stable=True).indices[: skipper.top_k]
    assert set(top.tolist()) <= set(selected.tolist())
    # ranks after K are kept exactly where the mask says
    order = torch.sort(-scores, stable=True).indices
    kept_tail = [int(c) for j, c in enumerate(order[skipper.top_k:]) if skipper.rank_mask[j]]
    assert set(selected.tolist()) == set(top.tolist()) | set(kept_tail) | set(labels.tolist())


def test_resample_step_varies_the_subset():
    skipper, g = _skipper(top_ratio=0.1, lam=1.0, resample="step")
    feats, labels = torch.randn(2, 16, generator=g), torch.tensor([3, 3])
    subsets = {tuple(skipper.select(feats, labels)[0].tolist()) for _ in range(10)}
    assert len(subsets) > 1
    fixed, _ = _skipper(top_ratio=0.1, lam=1.0, resample="fixed")
    assert len({tuple(fixed.select(feats, labels)[0].tolist()) for _ in range(10)}) == 1


def test_disabled_when_k_equals_c():
    skipper, g = _skipper(num_classes=8, top_ratio=1.0)
    assert not skipper.enabled
    selected, remapped = skipper.select(torch.randn(2, 16), torch.tensor([7, 1]))
    assert selected.tolist() == list(range(8)) and remapped.tolist() == [7, 1]


def test_ties_broken_by_class_index():
    prototypes = F.normalize(torch.ones(6, 4), dim=-1)  # every class scores the same
    mask = torch.zeros(4, dtype=torch.bool)
    selected, remapped = class_select_reference(F.normalize(torch.randn(1, 4), dim=-1), prototypes,
                                                torch.tensor([5]), mask, 2)
    assert selected.tolist() == [0, 5]  # label 5 forced, then the smallest index among ties
    assert remapped.tolist() == [1]


def test_state_round_trip_restores_mask_and_generator():
    a, _ = _skipper(resample="step", top_ratio=0.1)
    a.select(torch.randn(2, 16), torch.tensor([1, 2]))
    state = a.state_dict()
    b = ClassSkipper(a.prototypes, top_ratio=0.1, resample="step", seed=99)
    assert not torch.equal(b.rank_mask, a.rank_mask) or b.generator.get_state().ne(a.generator.get_state()).any()
    b.load_state_dict(state)
    feats, labels = torch.randn(2, 16), torch.tensor([1, 2])
    assert torch.equal(a.select(feats, labels)[0], b.select(feats, labels)[0])


def test_draw_rank_mask_uses_generator():
    m1 = draw_rank_mask(50, 10, 0.3, torch.Generator().manual_seed(1))
    m2 = draw_rank_mask(50, 10, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(m1, m2) and m1.shape == (40,) and m1[0] and not m1[-1]
