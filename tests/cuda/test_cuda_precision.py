"""Mixed precision on a GPU: torch.autocast("cuda") around a step with each backend, and bf16 /
fp16 weights, against the fp32 step. Skipped without a GPU."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import skipkernels  # noqa: E402
from skipkernels import _ext  # noqa: E402
from skipkernels.skip.tuner import SkipConfig, SkipTuner  # noqa: E402

from conftest import tiny_clip  # noqa: E402

CLASSES = ["ant", "bee", "cow", "dog", "elk", "fox"]
BACKENDS = ["auto", "torch", "triton"] + (["cuda"] if _ext.CUDA_BUILT else [])


def _loss(tuner, images, labels):
    inputs = tuner.image_prefix(images) if tuner.plan.caches_prefix else images
    loss = tuner.loss(inputs, labels)
    loss.backward()
    return loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_autocast_and_low_precision_weights(backend, dtype, tokenizer):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda()
    labels = torch.tensor([0, 1, 2, 3]).cuda()
    want = _loss(SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4).cuda()), CLASSES, tokenizer,
                           SkipConfig(skip_layers=2, top_ratio=6, cache_dtype="float32"), policy="torch"),
                 images, labels).item()
    tuner = SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4).cuda()), CLASSES, tokenizer,
                      SkipConfig(skip_layers=2, top_ratio=6), policy=backend)
    with torch.autocast("cuda", dtype=dtype):
        loss = _loss(tuner, images, labels)
    assert loss.dtype == torch.float32 and abs(loss.item() - want) < 0.05 * abs(want)
    weights = SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4).cuda().to(dtype)), CLASSES, tokenizer,
                        SkipConfig(skip_layers=2, top_ratio=6), policy=backend)
    assert weights.cache_dtype == dtype
    loss = _loss(weights, images.to(dtype), labels)
    assert torch.isfinite(loss) and abs(loss.item() - want) < 0.05 * abs(want)
