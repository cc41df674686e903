"""The frozen prefix forward (LSkip caching, evaluation): the blocks below ω, no autograd.

GPU: ViT-B/16's image tower, 6 blocks, batch 256 x 197 tokens x 768, bf16 autocast (as
``ImagePrefixCache.build`` runs it); the text tower, 6 blocks, 100 prompts truncated to 24 tokens
x 512, causal. CPU: tiny shapes so CI can smoke-run it.

``impl``:
- ``open_clip``: the blocks' own forward (eager open_clip), the baseline of the targets;
- ``open_clip_compile``: ``torch.compile`` of it (GPU, or SKIPKERNELS_BENCH_COMPILE=1);
- ``ops_torch``: ``blocks_forward`` on the reference ops (SDPA, ATen LayerNorm, cuBLAS);
- ``triton``: ``blocks_forward`` on the Triton kernels (LN fused into QKV / fc1, attention,
  residual epilogues);
- ``auto``: what ``backend="auto"`` picks from the measured table.

``extra_info``: CUDA-event median, images (or prompts) per second, achieved TFLOP/s and GB/s
(the bytes an ideal kernel sequence must move: weights once, each block's input and output once).
"""
import pytest
import torch

from conftest import ON_GPU, RUN_COMPILE, cuda_time, synced
from skipkernels._compat import import_open_clip
from skipkernels import use_backend
from skipkernels.ops.block import blocks_forward

if ON_GPU:
    TOWERS = {"image_b256": (256, 197, 768, 12, False), "text_b100_trunc24": (100, 24, 512, 8, True)}
    BLOCKS = 6
else:
    TOWERS = {"image": (4, 17, 64, 4, False), "text": (4, 8, 64, 4, True)}
    BLOCKS = 2
IMPLS = ["open_clip", "open_clip_compile", "ops_torch", "triton", "auto"]
DTYPE = torch.bfloat16


def _blocks(width, heads, device):
    open_clip = import_open_clip()
    torch.manual_seed(0)
    return torch.nn.ModuleList(open_clip.transformer.ResidualAttentionBlock(width, heads)
                               for _ in range(BLOCKS)).to(device).eval().requires_grad_(False)


def _flop(batch, tokens, width, causal):
    pairs = tokens * (tokens + 1) / 2 if causal else tokens * tokens
    per_block = 2 * batch * tokens * 12 * width * width + 4 * batch * pairs * width
    return BLOCKS * per_block


def _bytes(batch, tokens, width):
    weights = BLOCKS * 12 * width * width * 2
    return weights + BLOCKS * 2 * batch * tokens * width * 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tower", list(TOWERS))
def test_prefix_forward(benchmark, tower, impl, device):
    batch, tokens, width, heads, causal = TOWERS[tower]
    blocks = _blocks(width, heads, device)
    x = torch.randn(batch, tokens, width, device=device)
    mask = torch.full((tokens, tokens), float("-inf"), device=device).triu_(1) if causal else None

    def eager():
        h = x
        for block in blocks:
            h = block(h, attn_mask=mask)
        return h

    def ours():
        return blocks_forward(blocks, x, causal=causal)

    if impl == "open_clip":
        fn, backend = eager, "torch"
    elif impl == "open_clip_compile":
        if not RUN_COMPILE:
            pytest.skip("torch.compile cases run on a GPU or with SKIPKERNELS_BENCH_COMPILE=1")
        fn, backend = torch.compile(eager), "torch"
    else:
        fn, backend = ours, {"ops_torch": "torch", "triton": "triton", "auto": "auto"}[impl]

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=DTYPE, enabled=ON_GPU):
            return fn()

    with use_backend(backend):
        run()  # compile / autotune outside the timed region
        flop, nbytes = _flop(batch, tokens, width, causal), _bytes(batch, tokens, width)
        benchmark.extra_info.update(shape=[BLOCKS, batch, tokens, width], flop=flop, bytes=nbytes,
                                    dtype=str(DTYPE) if ON_GPU else "torch.float32",
                                    device=torch.cuda.get_device_name() if ON_GPU else "cpu")
        if ON_GPU and not getattr(benchmark, "disabled", False):
            seconds = cuda_time(run)
            benchmark.extra_info.update(median_ms=seconds * 1e3, items_per_s=batch / seconds,
                                        tflops=flop / seconds / 1e12, gbps=nbytes / seconds / 1e9)
        benchmark(synced(run))
