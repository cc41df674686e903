"""The whole Skip Tuning step on the Triton kernels equals plain open_clip.

With ``backend="triton"`` every block op of both towers runs a Triton kernel (LN fused into
QKV / fc1, attention forward and backward with the causal text mask, truncation and the pruned
last block's key_limit, residual epilogues): the frozen prefix under no_grad, the trainable
blocks forward and backward. Loss and every gradient must match open_clip's own forward, within
fp32 rounding of the scale of each gradient."""
import copy
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from conftest import assert_grads_equal, plain_loss_and_grads, tiny_clip, tuner_loss_and_grads  # noqa: E402
from skipkernels import SkipConfig, SkipTuner, use_backend  # noqa: E402
from conftest import TUNER_CLASSES as CLASSES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("block,mode", [("default", "lskip"), ("custom", "skip")])
def test_skip_tuning_step_on_triton_equals_open_clip(block, mode, tokenizer, monkeypatch):
    from skipkernels.triton import attention as tattn
    from skipkernels.triton import layer_norm_linear as tlnl
    from skipkernels.triton import linear as tlin
    calls = {}
    for module, name in ((tattn, "_backward"), (tattn, "_forward"), (tlnl, "_fused"), (tlin, "_gemm")):
        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    model = tiny_clip(block, layers=3).to(DEVICE)
    plain = copy.deepcopy(model)
    with use_backend("triton"):
        tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=1, top_ratio=0.25, lam=0.5))
    for p_plain, p in zip(plain.parameters(), model.parameters()):
        p_plain.requires_grad_(p.requires_grad)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g).to(DEVICE)
    labels = torch.tensor([6, 2, 6, 3], device=DEVICE)
    with use_backend("triton"):
        loss, grads = tuner_loss_and_grads(tuner, tuner.image_prefix(images), labels)
    classes, targets = CLASSES, labels
    if mode == "skip":  # CSkip: the same step over the selected classes only
        assert len(tuner.last_selected) < len(CLASSES)
        classes = [CLASSES[i] for i in tuner.last_selected.tolist()]
        targets = tuner.last_labels
    expected_loss, expected = plain_loss_and_grads(plain, images, targets, classes, tokenizer)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert_grads_equal(expected, grads, rel=1e-4)
    # The kernels really ran, forward and backward (not a silent fall-back to the reference).
    assert all(calls.get(name, 0) > 0 for name in ("_forward", "_backward", "_fused", "_gemm")), calls
