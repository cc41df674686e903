"""One transformer block (the unit of the trainable suffix), forward + backward, per backend.

ViT-B/16 shapes on a GPU (image 197x768, 12 heads; text 77x512 and a truncated 24x512, 8 heads;
batch 4 and 32); tiny shapes on a CPU so CI can smoke-run it.

``backend``: ``open_clip`` (the block's own eager forward: the baseline of the targets) and
``open_clip_compile`` (``torch.compile`` of it); ``torch`` / ``triton`` (``block_forward`` on the
reference ops / the Triton kernels) and ``compile`` (``torch.compile`` of ``block_forward`` on
the reference ops).
"""
import os

import pytest
import torch

from conftest import ON_GPU, RUN_COMPILE, synced
from skipkernels._compat import import_open_clip
from skipkernels import use_backend
from skipkernels.ops.block import block_forward

if ON_GPU:
    SHAPES = [("image", 4, 197, 768, 12), ("image", 32, 197, 768, 12), ("text", 100, 77, 512, 8),
              ("text", 100, 24, 512, 8)]
else:
    SHAPES = [("image", 2, 17, 64, 4), ("text", 4, 8, 64, 4)]


def _block(width, heads, device):
    open_clip = import_open_clip()
    torch.manual_seed(0)
    return open_clip.transformer.ResidualAttentionBlock(width, heads).to(device)


def _flops(batch, tokens, width):
    # 4 linear layers: qkv (3d^2), out (d^2), fc1 (4d^2), fc2 (4d^2) = 12 d^2 per token; attention 2*2*L*d
    fwd = 2 * batch * tokens * (12 * width * width) + 4 * batch * tokens * tokens * width
    return 3 * fwd  # forward + backward


@pytest.mark.parametrize("backend", ["open_clip", "open_clip_compile", "torch", "triton", "compile"])
@pytest.mark.parametrize("tower,batch,tokens,width,heads", SHAPES)
def test_block_forward_backward(benchmark, backend, tower, batch, tokens, width, heads, device):
    block = _block(width, heads, device)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x = torch.randn(batch, tokens, width, device=device, requires_grad=True)
    causal = tower == "text"

    mask = torch.full((tokens, tokens), float("-inf"), device=device).triu_(1) if causal else None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=ON_GPU):
            if backend.startswith("open_clip"):
                y = block(x, attn_mask=mask)
            else:
                y = block_forward(block, x, causal=causal)
        y.float().sum().backward()

    if backend.endswith("compile"):
        if not RUN_COMPILE:
            pytest.skip("torch.compile cases run on a GPU or with SKIPKERNELS_BENCH_COMPILE=1")
        fn = torch.compile(step)
        name = "torch"
    else:
        fn, name = step, "torch" if backend == "open_clip" else backend
    if name == "triton" and not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    with use_backend(name):
        fn()  # warm-up (compile, autotune); an error here is a failure, not a skip
        benchmark.extra_info["flop"] = _flops(batch, tokens, width)
        if ON_GPU:
            from conftest import cuda_time
            seconds = cuda_time(fn)
            benchmark.extra_info["median_s_cuda_events"] = seconds
            benchmark.extra_info["tflops"] = _flops(batch, tokens, width) / seconds / 1e12
        benchmark(synced(fn))
