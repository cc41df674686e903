"""The paper-style step (plain open_clip, eager, full prompts: the bench's ``paper`` baseline)
computes the same loss and gradients as SkipTuner on the same class subset."""
import copy

import pytest
import torch

from conftest import tiny_clip
from skipkernels import SkipConfig, SkipTuner
from skipkernels.skip.paper import PaperSkipTuning

CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "a very long class name with many words",
           "cat", "dog", "purple hexagon", "orange", "white cross"]


def _grads(module_params):
    return {n: p.grad.clone() for n, p in module_params if p.grad is not None}


@pytest.mark.parametrize("block", ["default", "custom"])
@pytest.mark.parametrize("omega", [1, 2])
def test_paper_step_equals_the_tuner(block, omega, tokenizer):
    model = tiny_clip(block, layers=3)
    tuner = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer,
                      SkipConfig(mode="skip", skip_layers=omega, top_ratio=0.3, max_top=3, lam=0.3), seed=4)
    paper = PaperSkipTuning(copy.deepcopy(model), CLASSES, tokenizer, skip_layers=omega, top_ratio=0.3,
                            max_top=3, lam=0.3, rank_mask=tuner.skipper.rank_mask)
    assert {n for n, p in paper.model.named_parameters() if p.requires_grad} == \
        {n[len("model."):] for n, _ in tuner.trainable_named_parameters()}
    torch.manual_seed(1)
    images = torch.randn(4, 3, 32, 32)
    for labels in (torch.tensor([0, 5, 5, 9]), torch.tensor([7, 7, 7, 7])):
        tuner.zero_grad(set_to_none=True)
        paper.zero_grad(set_to_none=True)
        expected = tuner.loss(tuner.image_prefix(images), labels)
        expected.backward()
        got = paper.loss(paper.image_prefix(images), labels)
        got.backward()
        assert torch.equal(paper.last_selected, tuner.last_selected)
        assert torch.equal(paper.last_labels, tuner.last_labels)
        assert 0 < len(paper.last_selected) < len(CLASSES)  # CSkip did skip classes
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        want = {n[len("model."):]: g for n, g in _grads(tuner.named_parameters()).items()}
        have = _grads(paper.model.named_parameters())
        assert want.keys() == have.keys()
        for name in want:
            scale = want[name].abs().max().item()
            assert (want[name] - have[name]).abs().max().item() <= 2e-5 * scale + 1e-8, name


def test_paper_mask_follows_the_description(tokenizer):
    paper = PaperSkipTuning(tiny_clip(layers=2), CLASSES, tokenizer, skip_layers=1, top_ratio=0.3, max_top=3)
    assert paper.top_k == 3 and paper.rank_mask.shape == (7,)
    assert bool(paper.rank_mask[0])  # keep probability 1 right after the top K, 0 at the end
    assert not bool(paper.rank_mask[-1])
