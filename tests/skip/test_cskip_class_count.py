"""CSkip's class count follows the authors' rule (SkipTuning, trainers/skip_tuning.py,
``select_classes``) at every setting, in the tuner and in the paper-style step alike
(docs/DEPARTURES.md lists what still differs, and why).

The rule: r <= 1 is a ratio, K = ceil(r*C); r > 1 is a count, K = ceil(min(r, C)); both capped at
max_top. r == 1.0 or K == C runs every class. With a fixed rank mask and at most K distinct labels
in a batch, the step runs K' = K + (kept lower ranks) classes. The first lower rank is always kept
and the last never, so C - K == 2 gives K' == K + 1; C - K == 1 keeps its lone lower rank (our
documented choice, where the authors' 0/0 keeps nothing), so K' == C.
"""
import copy

import pytest
import torch

from conftest import tiny_clip
from skipkernels import SkipConfig, SkipTuner
from skipkernels.ops.class_select import rank_keep_probs, top_k_for
from skipkernels.skip.paper import PaperSkipTuning

NAMES = ["red circle", "green square", "blue triangle", "yellow star", "cat", "dog", "purple hexagon",
         "orange", "white cross", "a very long class name with many words", "bird", "tree"]
MANY = [f"class number {i}" for i in range(100)]

# (C, top_ratio, max_top, K, K' or None where the random rank mask decides it, what the row checks)
CASES = [
    (12, 0.5, 50, 6, None, "ratio"),
    (12, 0.5, 4, 4, None, "ratio capped by max_top"),
    (7, 0.5, 50, 4, None, "ratio, ceil(3.5)"),
    (12, 0.05, 50, 1, None, "ratio, ceil(0.6)"),
    (12, 1.0, 50, 12, 12, "r = 1.0: every class"),
    (12, 1.0, 5, 12, 12, "r = 1.0: every class, whatever max_top"),
    (100, 1.0, 50, 100, 100, "r = 1.0 at C = 100, max_top = 50: every class, not 50"),
    (12, 3, 50, 3, None, "count, integral"),
    (12, 2.5, 50, 3, None, "count, not integral: ceil(2.5)"),
    (12, 1.5, 50, 2, None, "count just above 1"),
    (12, 8, 5, 5, None, "count capped by max_top"),
    (100, 60, 50, 50, None, "count 60 capped by max_top 50"),
    (12, 30, 50, 12, 12, "count above C: every class"),
    (12, 30, 7, 7, None, "count above C, capped by max_top"),
    (12, 12, 50, 12, 12, "count = C: K = C"),
    (12, 0.95, 50, 12, 12, "ratio giving K = C (C - K = 0)"),
    (12, 0.9, 50, 11, 12, "C - K = 1, ratio: the lone lower rank is kept"),
    (12, 11, 50, 11, 12, "C - K = 1, count"),
    (12, 0.95, 11, 11, 12, "C - K = 1, max_top"),
    (2, 0.5, 50, 1, 2, "C = 2: K = 1 and the lone lower rank kept, so a step never has one class"),
    (12, 0.8, 50, 10, 11, "C - K = 2: the first lower rank kept, the last not"),
    (12, 0.95, 10, 10, 11, "C - K = 2, max_top"),
]


def _names(count):
    return NAMES[:count] if count <= len(NAMES) else MANY[:count]


@pytest.mark.parametrize("num_classes, top_ratio, max_top, top_k, subset, why", CASES,
                         ids=[f"C{c}-r{r}-max{m}" for c, r, m, *_ in CASES])
def test_class_count_follows_the_authors_rule(num_classes, top_ratio, max_top, top_k, subset, why, tokenizer):
    assert top_k_for(num_classes, top_ratio, max_top) == top_k, why
    names = _names(num_classes)
    model = tiny_clip(layers=2)
    tuner = SkipTuner(copy.deepcopy(model), names, tokenizer,
                      SkipConfig(mode="skip", skip_layers=1, top_ratio=top_ratio, max_top=max_top), seed=5)
    skipper = tuner.skipper
    assert skipper.top_k == top_k and skipper.enabled == (top_k < num_classes), why
    assert skipper.rank_mask.shape == (num_classes - top_k,)
    own = PaperSkipTuning(copy.deepcopy(model), names, tokenizer, skip_layers=1, top_ratio=top_ratio,
                          max_top=max_top, seed=5)
    assert own.top_k == top_k and own.rank_mask.shape == (num_classes - top_k,), why
    paper = PaperSkipTuning(copy.deepcopy(model), names, tokenizer, skip_layers=1, top_ratio=top_ratio,
                            max_top=max_top, rank_mask=skipper.rank_mask)

    # Count the prompts that reach the trainable text blocks, in both steps.
    text_rows = {}
    encode_from = tuner.towers.text.encode_from

    def counting_encode_from(x, *args, **kwargs):
        text_rows["tuner"] = x.shape[0]
        return encode_from(x, *args, **kwargs)

    tuner.towers.text.encode_from = counting_encode_from
    paper.model.transformer.resblocks[1].register_forward_pre_hook(
        lambda module, args: text_rows.__setitem__("paper", args[0].shape[0]))

    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    label = 3 % num_classes
    labels = torch.full((4,), label)  # one class a batch (the protocol for shots >= 4): <= K labels
    tuner.loss(tuner.image_prefix(images), labels)
    paper.loss(paper.image_prefix(images), labels)

    expected = top_k + int(skipper.rank_mask.sum()) if subset is None else subset
    assert len(tuner.last_selected) == expected == skipper.fixed_size, why
    assert text_rows == {"tuner": expected, "paper": expected}, why
    assert torch.equal(paper.last_selected, tuner.last_selected) and torch.equal(paper.last_labels, tuner.last_labels)
    if top_k == num_classes:
        assert tuner.last_selected.tolist() == list(range(num_classes)), "every class runs in the text tower"
        assert "CSkip: off" in repr(tuner)
    else:
        assert f"the top K = {top_k} of C = {num_classes}" in repr(tuner)
    if subset is not None and top_k < num_classes:  # C - K in {1, 2}: the mask is not random there
        expected_mask = [True] if num_classes - top_k == 1 else [True, False]
        assert own.rank_mask.tolist() == skipper.rank_mask.tolist() == expected_mask


def test_the_lone_lower_rank_is_always_kept():
    """C - K == 1: the position is the first lower rank (always kept elsewhere) and the last (never
    kept). The authors' min-max division is 0/0 there, a NaN that keeps nothing; we keep it."""
    assert rank_keep_probs(1, 0.3).tolist() == [1.0]
    assert rank_keep_probs(2, 0.3).tolist() == [1.0, 0.0]
    assert rank_keep_probs(0, 0.3).shape == (0,)


def test_two_classes_still_train_on_one_class_batches(tokenizer):
    """Why the lone lower rank is kept: at C = 2, K = 1, and the authors' rule would leave a batch
    of one class a one-class subset, whose cross-entropy is 0, so nothing would train."""
    tuner = SkipTuner(tiny_clip(layers=2), NAMES[:2], tokenizer, SkipConfig(mode="skip", skip_layers=1))
    assert tuner.skipper.top_k == 1 and tuner.skipper.rank_mask.tolist() == [True]
    loss = tuner.loss(tuner.image_prefix(torch.randn(4, 3, 32, 32)), torch.tensor([1, 1, 1, 1]))
    assert tuner.last_selected.tolist() == [0, 1] and loss.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in tuner.trainable_named_parameters())
