"""torch.compile traces the op dispatch and the tuner's static loss without a graph break.

On CUDA the dispatch once called into the extension (pybind) to ask whether CUDA was built, which
dynamo refuses inside a traced function ("Attempted to call function marked as skipped"); on CPU
that branch was never reached, so the CPU compile tests passed. Backend facts are import-time
constants now; these tests hold the dispatch to that on any machine.
"""
import copy

import pytest
import torch

from conftest import tiny_clip
from skipkernels import SkipConfig, SkipTuner, _ext

CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "cat", "dog", "purple hexagon",
           "orange"]


class _NoCalls:
    def __getattr__(self, name):
        raise AssertionError(f"dispatch called skipkernels._C.{name} at run time")


@pytest.mark.parametrize("name", ["class_select", "subset_logits_ce", "class_scores_topk"])
def test_dispatch_reads_constants_not_the_extension(monkeypatch, name):
    """Binding a compiled op under auto reads the extension's constants once; the bound op then
    decides per call from the tensors' device type alone."""
    from skipkernels.ops.op import OPS, _AutoCompiled
    monkeypatch.setattr(_ext, "_C", _NoCalls())
    bound = OPS[name].bind("auto")
    if name not in _ext.COMPILED_OPS:
        assert bound is OPS[name].fallback(None)
        return
    assert isinstance(bound, _AutoCompiled)
    for device in ("cpu", "cuda", "meta"):
        expected = device == "cpu" or (device == "cuda" and _ext.CUDA_BUILT)
        assert (device in bound.kinds) is expected and _ext.has_kernel(name, device) is expected
    assert OPS[name].bind("torch") is OPS[name].reference


@pytest.mark.parametrize("mode", ["skip", "lskip"])
def test_tuner_static_loss_traces_in_one_graph(mode, tokenizer):
    model = tiny_clip(layers=2)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=1, top_ratio=0.5, max_top=4))
    images = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([1, 6])
    inputs = tuner.image_prefix(images)
    expected = tuner.loss(inputs, labels, static=True)
    expected_selected = tuner.last_selected.clone()

    def step(x, y):
        return tuner.loss(x, y, static=True)

    traced = torch.compile(step, fullgraph=True, backend="aot_eager")(inputs, labels)
    torch.testing.assert_close(traced, expected)
    assert torch.equal(tuner.last_selected, expected_selected)


@pytest.mark.parametrize("family", ["siglip", "eva02"])
def test_other_families_static_loss_traces_in_one_graph(family):
    from skipkernels.models import create_model
    model, tokenizer = create_model(f"skipkernels-tiny-{family}", tokenizer="ViT-B-16")
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5, max_top=4))
    inputs = tuner.image_prefix(torch.randn(2, 3, 32, 32))
    labels = torch.tensor([1, 6])
    expected = tuner.loss(inputs, labels, static=True)
    traced = torch.compile(lambda x, y: tuner.loss(x, y, static=True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(traced(inputs, labels), expected)


@pytest.mark.skipif("subset_logits_ce" not in _ext.COMPILED_OPS, reason="skipkernels._C not built")
@pytest.mark.parametrize("with_logits", [False, True])
def test_subset_ce_loss_is_a_custom_op_with_registered_autograd(with_logits):
    from skipkernels.ops import _subset_ce_autograd  # noqa: F401  (registers skipkernels::subset_ce_loss)
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(3, 8, generator=gen, requires_grad=True)
    t = torch.randn(5, 8, generator=gen, requires_grad=True)
    scale = torch.tensor(20.0, requires_grad=True)
    labels = torch.tensor([0, 4, 2])
    # schema, fake (meta) impl, autograd registration and tracing by AOTAutograd
    torch.library.opcheck(torch.ops.skipkernels.subset_ce_loss, (f, t, scale, labels, with_logits))

