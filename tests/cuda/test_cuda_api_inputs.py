"""Bad input to the Python API with a model on the GPU: tensors on the wrong device and the
static (CUDA-graph) path's metadata checks. Skipped without a GPU."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import skipkernels  # noqa: E402
from skipkernels.skip.tuner import SkipConfig, SkipTuner  # noqa: E402

from conftest import tiny_clip  # noqa: E402

CLASSES = ["ant", "bee", "cow", "dog"]


@pytest.fixture(scope="module")
def tuner(tokenizer):
    return SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4).cuda()), CLASSES, tokenizer, SkipConfig(skip_layers=2))


@pytest.mark.parametrize("call,error,word", [
    (lambda t: t.image_prefix(torch.randn(2, 3, 32, 32)), ValueError, "is on cpu, the model on cuda"),
    (lambda t: t.loss(t.image_prefix(torch.randn(2, 3, 32, 32).cuda()).cpu(), torch.tensor([0, 1])), ValueError,
     "is on cpu"),
    (lambda t: t.loss(t.image_prefix(torch.randn(2, 3, 32, 32).cuda()), torch.tensor([0.0, 1.0]).cuda(),
                      static=True), TypeError, "integer class indices"),
    (lambda t: t.loss(torch.randn(2, 3, 32, 32).cuda(), torch.tensor([0, 1]).cuda(), static=True), ValueError,
     "image_prefix"),
], ids=["prefix on cpu", "loss prefix on cpu", "static float labels", "static raw images"])
def test_cuda_bad_input_is_refused_clearly(call, error, word, tuner):
    with pytest.raises(error, match=word):
        call(tuner)
