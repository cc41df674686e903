"""LayerNorm fused into the GEMM prologue (``skipkernels.triton.layer_norm_linear``) vs the reference
(``layer_norm`` then ``F.linear`` + epilogue) and an fp64 oracle."""
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first triton kernel definition; the lead's conftest may set it already.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from skipkernels.ops import layer_norm_linear as ops_lnl  # noqa: E402
from skipkernels.triton import layer_norm_linear as tlnl  # noqa: E402
from kernel_checks import poison_outputs, SEED, assert_fp64_rule, saved_activation_bytes  # noqa: E402,F401  (poison_outputs: autouse)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["none", "gelu", "quick_gelu"]
# (leading dims, K, N): 3 / 17 / 77 tokens; K of one chunk, of a partial last chunk (200) and of
# ViT-B's 768 (several chunks of the statistics pass); N not a tile multiple.
SHAPES = [((3,), 64, 192), ((2, 17), 200, 96), ((1, 77), 64, 256), ((5,), 768, 64)]
REFERENCE = ops_lnl.layer_norm_linear_reference


def _inputs(lead, k, n, dtype, seed=0, offset=1.0):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    # A residual stream: an offset and a few outlier channels, so the statistics matter.
    x = torch.randn(*lead, k, generator=g) * 2 + offset
    x[..., :3] *= 8
    ln_w = 1 + 0.3 * torch.randn(k, generator=g)
    ln_b = 0.2 * torch.randn(k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = 0.5 * torch.randn(n, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, ln_w, ln_b, w, b)]


def _double(tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_forward(lead, k, n, act, dtype):
    x, lw, lb, w, b = _inputs(lead, k, n, dtype)
    out = tlnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, act)
    assert out.shape == (*lead, n) and out.dtype == dtype
    ref64 = REFERENCE(*_double((x, lw, lb)), 1e-5, *_double((w, b)), act)
    assert_fp64_rule(out, REFERENCE(x, lw, lb, 1e-5, w, b, act), ref64, f"ln_linear[{act}]")


def test_statistics_with_large_offset():
    """Rows with mean 1000 and std 2: a one-pass E[x²]−E[x]² variance would lose every digit."""
    x, lw, lb, w, b = _inputs((4,), 768, 64, torch.float32, seed=1, offset=1000.0)
    out = tlnl.layer_norm_linear(x, lw, lb, 1e-5, w, b)
    ref64 = REFERENCE(*_double((x, lw, lb)), 1e-5, *_double((w, b)))
    assert_fp64_rule(out, REFERENCE(x, lw, lb, 1e-5, w, b), ref64, "offset rows")


@pytest.mark.parametrize("affine", ["none", "weight_only", "no_linear_bias"])
def test_optional_parameters(affine):
    x, lw, lb, w, b = _inputs((2, 17), 64, 96, torch.float32, seed=2)
    if affine == "none":
        lw = lb = None
    elif affine == "weight_only":
        lb = None
    else:
        b = None
    out = tlnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, "gelu")
    ref64 = REFERENCE(*_double((x, lw, lb)), 1e-5, *_double((w, b)), "gelu")
    assert_fp64_rule(out, REFERENCE(x, lw, lb, 1e-5, w, b, "gelu"), ref64, affine)


def _grads(fn, inputs, gout):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    (fn(*inputs).double() * gout).sum().backward()
    return [t.grad for t in inputs]


@pytest.mark.parametrize("act", ["none", "gelu", "quick_gelu"])
@pytest.mark.parametrize("lead,k,n", [((3,), 64, 192), ((2, 17), 200, 96)])
def test_backward(lead, k, n, act):
    inputs = _inputs(lead, k, n, torch.float32, seed=3)
    g = torch.Generator().manual_seed(SEED * 1000 + 4)
    gout = torch.randn(*lead, n, generator=g, dtype=torch.float64).to(DEVICE)

    def split(fn):
        return lambda x, lw, lb, w, b: fn(x, lw, lb, 1e-5, w, b, act)

    fused = _grads(split(tlnl.layer_norm_linear), inputs, gout)
    ref = _grads(split(REFERENCE), inputs, gout)
    exact = _grads(split(REFERENCE), _double(inputs), gout)
    scale = max(t.abs().max().item() for t in exact)
    for name, gf, gr, ge in zip(("x", "ln_w", "ln_b", "W", "b"), fused, ref, exact):
        assert_fp64_rule(gf, gr, ge, f"d{name}[{act}]", scale=scale)


def test_backward_half_precision():
    inputs = _inputs((2, 17), 64, 96, torch.float16, seed=5)
    gout = torch.randn(2, 17, 96, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64).to(DEVICE)
    fn = lambda x, lw, lb, w, b, f: f(x, lw, lb, 1e-5, w, b, "gelu")  # noqa: E731
    fused = _grads(lambda *a: fn(*a, tlnl.layer_norm_linear), inputs, gout)
    ref = _grads(lambda *a: fn(*a, REFERENCE), inputs, gout)
    exact = _grads(lambda *a: fn(*a, REFERENCE), _double(inputs), gout)
    for name, gf, gr, ge in zip(("x", "ln_w", "ln_b", "W", "b"), fused, ref, exact):
        assert gf.dtype == torch.float16
        assert_fp64_rule(gf, gr, ge, f"fp16 d{name}", scale=ge.abs().max().item())


def test_autocast_normalises_in_input_dtype():
    """Under autocast the LN runs on the fp32 stream and only the GEMM operands are cast, as in
    the reference (autocast keeps layer_norm in fp32, casts F.linear's inputs)."""
    x, lw, lb, w, b = _inputs((2, 17), 64, 96, torch.float32, seed=6)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = tlnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, "gelu")
        ref = REFERENCE(x, lw, lb, 1e-5, w, b, "gelu")
    assert out.dtype == ref.dtype == torch.bfloat16
    exact = REFERENCE(*_double((x, lw, lb)), 1e-5, *_double((w, b)), "gelu")
    assert_fp64_rule(out, ref, exact, "autocast")


def test_saves_no_normalised_rows():
    """Backward keeps x and two fp32 row statistics, not the LN output the unfused path keeps."""
    x, lw, lb, w, b = _inputs((4, 17), 64, 256, torch.float32, seed=7)
    params = [t.requires_grad_(True) for t in (lw, lb, w, b)]

    x.requires_grad_(True)

    def saved_bytes(fn):
        return saved_activation_bytes(lambda: fn(x, *params[:2], 1e-5, *params[2:], "none"), params)

    fused, unfused = saved_bytes(tlnl.layer_norm_linear), saved_bytes(REFERENCE)
    rows = x.numel() // x.shape[-1]
    assert fused <= x.numel() * 4 + 2 * rows * 4
    assert unfused - fused >= x.numel() * 4  # at least the normalised rows are not kept


def test_no_grad_keeps_nothing():
    x, lw, lb, w, b = _inputs((3,), 64, 64, torch.float32)
    w.requires_grad_(True)
    with torch.no_grad():
        out = tlnl.layer_norm_linear(x, lw, lb, 1e-5, w, b)
    assert out.grad_fn is None


def test_bad_arguments():
    x, lw, lb, w, b = _inputs((3,), 64, 32, torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        tlnl.layer_norm_linear(x[..., :32], lw[:32], lb[:32], 1e-5, w, b)
    with pytest.raises(ValueError, match="ln_weight"):
        tlnl.layer_norm_linear(x, lw[:32], lb, 1e-5, w, b)
    with pytest.raises(ValueError, match="activation"):
        tlnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, "relu")
    with pytest.raises(TypeError, match="F.linear"):
        tlnl.layer_norm_linear(x, lw, lb, 1e-5, w.half(), b.half())


def test_dispatch():
    x, lw, lb, w, b = _inputs((2, 17), 64, 96, torch.float32, seed=8)
    w.requires_grad_(True)
    fused = ops_lnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, "gelu", backend="triton")
    assert type(fused.grad_fn).__name__ == "_LayerNormLinearFnBackward"
    ref = ops_lnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, "gelu", backend="torch")
    assert type(ref.grad_fn).__name__ == "GeluBackward0"
    torch.testing.assert_close(fused, ref)
    # No GPU measurement for CPU tensors: auto runs the reference composition.
    auto = ops_lnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, "gelu", backend="auto")
    assert type(auto.grad_fn).__name__ == "GeluBackward0"


def test_strided_input():
    """x as a strided view (every other token): the GEMM reads strides, backward copes too."""
    x, lw, lb, w, b = _inputs((2, 34), 64, 96, torch.float32, seed=9)
    xs = x[:, ::2]
    assert not xs.is_contiguous()
    g = torch.Generator().manual_seed(SEED * 1000 + 10)
    gout = torch.randn(2, 17, 96, generator=g, dtype=torch.float64).to(DEVICE)
    fn = lambda f: (lambda x, lw, lb, w, b: f(x, lw, lb, 1e-5, w, b, "gelu"))  # noqa: E731
    fused = _grads(fn(tlnl.layer_norm_linear), [xs, lw, lb, w, b], gout)
    exact = _grads(fn(REFERENCE), _double([xs, lw, lb, w, b]), gout)
    for name, gf, ge in zip(("x", "ln_w", "ln_b", "W", "b"), fused, exact):
        torch.testing.assert_close(gf.double(), ge, rtol=1e-4, atol=1e-4 * ge.abs().max().item(), msg=name)
