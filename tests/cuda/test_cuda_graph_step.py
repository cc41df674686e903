"""A whole Skip Tuning step captured in a CUDA graph replays like the eager step (GPU only)."""
import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import tiny_clip  # noqa: E402
from skipkernels import SkipConfig, SkipTuner, _ext  # noqa: E402
from skipkernels import KernelPolicy, use_policy  # noqa: E402
from skipkernels.ops.policy import ALL_TRITON  # noqa: E402
from skipkernels.skip.graph import CapturedStep  # noqa: E402

CLASSES = [f"class {i} " + "word " * (i % 5) for i in range(40)]


@pytest.mark.skipif(not _ext.CUDA_BUILT, reason="compiled CUDA ops not built")
@pytest.mark.parametrize("kernels", ["auto", "all_triton"])
def test_captured_step_equals_eager_steps(kernels, tokenizer):
    """``all_triton``: every block op on a Triton kernel (bench mode skip-triton-graph), so the
    kernels must be capturable: no host sync, autotuning done in the warm-up."""
    if kernels == "all_triton":
        with use_policy(KernelPolicy("auto", table=ALL_TRITON)):
            return _captured_step_equals_eager_steps(tokenizer)
    return _captured_step_equals_eager_steps(tokenizer)


@pytest.mark.skipif(not _ext.CUDA_BUILT, reason="compiled CUDA ops not built")
@pytest.mark.parametrize("family", ["siglip", "eva02"])
def test_captured_step_equals_eager_steps_for_other_families(family):
    """SigLIP (timm ViT with attention pooling, bidirectional text) and EVA-02 (timm Eva with
    rotary embeddings, blocks through their own forward) inside the same CUDA-graph step."""
    from skipkernels.models import create_model
    model, tokenizer = create_model(f"skipkernels-tiny-{family}", tokenizer="ViT-B-16")
    _captured_step_equals_eager_steps(tokenizer, model)


def _captured_step_equals_eager_steps(tokenizer, model=None):
    model = (tiny_clip(layers=3) if model is None else model).cuda()
    eager = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="skip", skip_layers=1, top_ratio=0.25, lam=0.5))
    graphed = copy.deepcopy(eager)
    opts = [torch.optim.SGD([p for _, p in t.trainable_named_parameters()], lr=1e-2, momentum=0.9,
                            weight_decay=5e-4) for t in (eager, graphed)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g).cuda(), torch.randint(0, 40, (4,), generator=g).cuda())
               for _ in range(5)]
    tokens = [eager.image_prefix(images) for images, _ in batches]
    step = CapturedStep(graphed, opts[1], tokens[0], batches[0][1], autocast_dtype=None)
    for x, (_, labels) in zip(tokens, batches):
        opts[0].zero_grad(set_to_none=True)
        loss_eager = eager.loss(x, labels, static=True)
        loss_eager.backward()
        opts[0].step()
        loss_graph = step(x, labels).clone()
        torch.testing.assert_close(loss_graph, loss_eager.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(graphed.last_selected, eager.last_selected)
    for (name, a), (_, b) in zip(eager.trainable_named_parameters(), graphed.trainable_named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    _ext.check_cuda_errors()
