"""torch.compile(fullgraph=True) traces the tuner's static loss on CUDA: the compiled CSkip ops,
auto's dispatch and the block ops, without a graph break (GPU only)."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import tiny_clip  # noqa: E402
from skipkernels import SkipConfig, SkipTuner, _ext  # noqa: E402

CLASSES = [f"class {i} " + "word " * (i % 5) for i in range(40)]


@pytest.mark.skipif(not _ext.CUDA_BUILT, reason="compiled CUDA ops not built")
@pytest.mark.parametrize("autocast", [False, True])
def test_tuner_static_loss_traces_in_one_graph_on_cuda(autocast, tokenizer):
    tuner = SkipTuner(tiny_clip(layers=2).cuda(), CLASSES, tokenizer,
                      SkipConfig(mode="skip", skip_layers=1, top_ratio=0.25, lam=0.5))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g).cuda()
    labels = torch.randint(0, 40, (4,), generator=g).cuda()
    inputs = tuner.image_prefix(images)

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return tuner.loss(x, y, static=True)

    expected = step(inputs, labels)
    traced = torch.compile(step, fullgraph=True, backend="aot_eager")(inputs, labels)
    torch.testing.assert_close(traced, expected, rtol=1e-4, atol=1e-4)
