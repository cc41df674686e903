"""Triton kernel microbenchmarks against the reference ops (and torch.compile of them).

Each case times one op, forward or forward + backward, for ``impl`` in
- ``torch``: the op layer's PyTorch reference (cuBLAS / SDPA / ATen LayerNorm on a GPU),
- ``compile``: ``torch.compile`` of that reference (GPU, or SKIPKERNELS_BENCH_COMPILE=1),
- ``triton``: ``skipkernels.triton``.

GPU: ViT-B/16 shapes in bf16 — image tower 4 x 197 tokens x 768 (12 heads), text tower 100 prompts
x 77 x 512 (8 heads), the same truncated to 24 tokens, and the pruned last block (one pooled query
over the keys, ``key_limit``). ``benchmark.extra_info`` gets the median from
``triton.testing.do_bench`` (CUDA events) with achieved TFLOP/s and GB/s (bytes an ideal fused
kernel must move: inputs read once, outputs written once).

CPU: tiny shapes, Triton under TRITON_INTERPRET=1 (set by bench/conftest.py), so CI can smoke-run
``pytest bench/test_bench_triton.py --benchmark-disable``. CPU timings of the interpreter mean
nothing about GPU speed.
"""
import os

import pytest
import torch

from conftest import ON_GPU, RUN_COMPILE, cuda_time, synced
from skipkernels.ops import attention as ops_attn
from skipkernels.ops import layer_norm as ops_ln
from skipkernels.ops import layer_norm_linear as ops_lnl
from skipkernels.ops import layer_norm_mlp as ops_mlp
from skipkernels.ops import linear as ops_lin
from skipkernels.ops.measured import case_info

DTYPE = torch.bfloat16 if ON_GPU else torch.float32
IMPLS = ["torch", "compile", "triton"]
MODES = ["fwd", "fwd_bwd"]

if ON_GPU:
    # name: (tokens M, width D, heads, sequence length L, batch B)
    TOWERS = {"image_b4": (4 * 197, 768, 12, 197, 4), "text_b100": (100 * 77, 512, 8, 77, 100),
              "text_b100_trunc24": (100 * 24, 512, 8, 24, 100)}
else:
    TOWERS = {"image": (2 * 17, 64, 2, 17, 2), "text_trunc": (3 * 8, 64, 2, 8, 3)}


def _triton_available():
    return ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"


def _kernels(module):
    if not _triton_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    import importlib
    return importlib.import_module(f"skipkernels.triton.{module}")


def _impl_fn(impl, reference, module, name):
    if impl == "torch":
        return reference
    if impl == "compile":
        if not RUN_COMPILE:
            pytest.skip("torch.compile cases run on a GPU or with SKIPKERNELS_BENCH_COMPILE=1")
        return torch.compile(reference)
    return getattr(_kernels(module), name)


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _run(benchmark, op, inputs, mode, flop, nbytes, **info):
    """Benchmark ``op(*inputs)`` (+ backward), with CUDA-event medians and rates on a GPU."""
    if mode == "fwd_bwd":
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.requires_grad_(True)
        out = op(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.randn_like(o) for o in outs]

        def fn():
            res = op(*inputs)
            res = res if isinstance(res, tuple) else (res,)
            torch.autograd.backward(res, grads)
        flop, nbytes = 3 * flop, 3 * nbytes  # backward: about twice the forward's work and traffic
    else:
        def fn():
            with torch.no_grad():
                return op(*inputs)
    fn()  # compile / autotune outside the timed region
    benchmark.extra_info.update(info, mode=mode, dtype=str(DTYPE), flop=flop, bytes=nbytes,
                                device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    if ON_GPU and not getattr(benchmark, "disabled", False):
        grad_to_none = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        seconds = cuda_time(fn) if not grad_to_none else _cuda_time_grads(fn, grad_to_none)
        benchmark.extra_info.update(median_ms=seconds * 1e3, tflops=flop / seconds / 1e12,
                                    gbps=nbytes / seconds / 1e9)
    benchmark(synced(fn))
    stats = getattr(benchmark, "stats", None)
    if not ON_GPU and stats is not None:
        # CPU: rates from pytest-benchmark's own median (the interpreter's, for Triton).
        seconds = stats.stats.median
        benchmark.extra_info.update(median_ms=seconds * 1e3, tflops=flop / seconds / 1e12,
                                    gbps=nbytes / seconds / 1e9)


def _cuda_time_grads(fn, grad_to_none):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=50, grad_to_none=grad_to_none,
                                   return_mode="median") / 1000.0


def _randn(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(DTYPE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tower", list(TOWERS))
def test_layer_norm(benchmark, tower, impl, mode, device):
    m, d = TOWERS[tower][:2]
    fn = _impl_fn(impl, ops_ln.layer_norm_reference, "layer_norm", "layer_norm")
    x, w, b = _randn(m, d, device=device), _randn(d, device=device), _randn(d, device=device)
    _run(benchmark, lambda x, w, b: fn(x, w, b, 1e-5), [x, w, b], mode,
         flop=8 * m * d, nbytes=_nbytes(x, w, b) + _nbytes(x), shape=[m, d],
         case=case_info("layer_norm", ops_ln.layer_norm_case(x)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"] if ON_GPU else ["gelu"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_linear_act_fc1(benchmark, tower, act, impl, mode, device):
    m, d = TOWERS[tower][:2]
    fn = _impl_fn(impl, ops_lin.linear_act_reference, "linear", "linear_act")
    x = _randn(m, d, device=device)
    w, b = _randn(4 * d, d, device=device, scale=d ** -0.5), _randn(4 * d, device=device)
    out_bytes = m * 4 * d * x.element_size()
    _run(benchmark, lambda x, w, b: fn(x, w, b, act), [x, w, b], mode,
         flop=2 * m * d * 4 * d, nbytes=_nbytes(x, w, b) + out_bytes, shape=[m, d, 4 * d], act=act,
         case=case_info("linear_act", ops_lin.linear_act_case(x, w, b, act)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("proj", ["qkv", "fc1"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_layer_norm_linear(benchmark, tower, proj, impl, mode, device):
    """LN→QKV and LN→fc1+GELU: the fused prologue kernel vs LayerNorm then the GEMM."""
    m, d = TOWERS[tower][:2]
    n, act = (3 * d, "none") if proj == "qkv" else (4 * d, "gelu")
    fn = _impl_fn(impl, ops_lnl.layer_norm_linear_reference, "layer_norm_linear", "layer_norm_linear")
    x, lw, lb = _randn(m, d, device=device), _randn(d, device=device), _randn(d, device=device)
    w, b = _randn(n, d, device=device, scale=d ** -0.5), _randn(n, device=device)
    _run(benchmark, lambda x, lw, lb, w, b: fn(x, lw, lb, 1e-5, w, b, act), [x, lw, lb, w, b], mode,
         flop=2 * m * d * n + 8 * m * d, nbytes=_nbytes(x, lw, lb, w, b) + m * n * x.element_size(),
         shape=[m, d, n], act=act,
         case=case_info("layer_norm_linear", ops_lnl.layer_norm_linear_case(x, lw, lb, 1e-5, w, b, act)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"] if ON_GPU else ["gelu"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_layer_norm_mlp(benchmark, tower, act, impl, mode, device):
    """The MLP sub-block x + fc2(act(fc1(LN(x)))): one op vs the reference composition."""
    m, d = TOWERS[tower][:2]
    fn = _impl_fn(impl, ops_mlp.layer_norm_mlp_reference, "layer_norm_mlp", "layer_norm_mlp")
    x, lw, lb = _randn(m, d, device=device), _randn(d, device=device), _randn(d, device=device)
    w1, b1 = _randn(4 * d, d, device=device, scale=d ** -0.5), _randn(4 * d, device=device)
    w2, b2 = _randn(d, 4 * d, device=device, scale=(4 * d) ** -0.5), _randn(d, device=device)
    _run(benchmark, lambda x, lw, lb, w1, b1, w2, b2: fn(x, lw, lb, 1e-5, w1, b1, act, w2, b2),
         [x, lw, lb, w1, b1, w2, b2], mode, flop=2 * 2 * m * d * 4 * d + 8 * m * d,
         nbytes=_nbytes(x, lw, lb, w1, b1, w2, b2) + _nbytes(x), shape=[m, d, 4 * d], act=act, scale="none",
         case=case_info("layer_norm_mlp", ops_mlp.layer_norm_mlp_case(x, lw, lb, 1e-5, w1, b1, act, w2, b2)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer", ["out_proj", "fc2"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_linear_residual(benchmark, tower, layer, impl, mode, device):
    m, d = TOWERS[tower][:2]
    k = d if layer == "out_proj" else 4 * d
    fn = _impl_fn(impl, ops_lin.linear_residual_reference, "linear", "linear_residual")
    x, res = _randn(m, k, device=device), _randn(m, d, device=device)
    w, b = _randn(d, k, device=device, scale=k ** -0.5), _randn(d, device=device)
    _run(benchmark, fn, [x, w, b, res], mode,
         flop=2 * m * k * d, nbytes=_nbytes(x, w, b, res) + _nbytes(res), shape=[m, k, d], scale="none",
         case=case_info("linear_residual", ops_lin.linear_residual_case(x, w, b, res)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["full", "pooled_query"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_attention(benchmark, tower, kind, impl, mode, device):
    _, d, heads, length, batch = TOWERS[tower]
    head_dim = d // heads
    text = tower.startswith("text")
    fn = _impl_fn(impl, ops_attn.attention_reference, "attention", "attention")
    lq = 1 if kind == "pooled_query" else length
    q = _randn(batch, heads, lq, head_dim, device=device)
    k, v = _randn(batch, heads, length, head_dim, device=device), _randn(batch, heads, length, head_dim, device=device)
    kwargs, mask = {}, "none"
    pairs = lq * length
    if kind == "pooled_query" and text:
        # Pruned last text block: the EOT row sees keys up to its own position.
        limit = torch.randint(length // 2, length + 1, (batch,), device=device)
        kwargs["key_limit"], mask = limit, "key_limit"
        pairs = float(limit.float().mean())
    elif text:
        kwargs["causal"], mask = True, "causal"
        pairs = length * (length + 1) / 2
    _run(benchmark, lambda q, k, v: fn(q, k, v, **kwargs), [q, k, v], mode,
         flop=int(4 * batch * heads * pairs * head_dim), nbytes=_nbytes(q, k, v, q),
         shape=[batch, heads, lq, length, head_dim], mask=mask,
         case=case_info("attention", ops_attn.attention_case(q, k, v, **kwargs)))
