import os

import torch

if not torch.cuda.is_available():
    # Must precede the first triton kernel definition; the lead's conftest may set it already.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from skipkernels.ops import layer_norm as ops_ln  # noqa: E402
from skipkernels.triton import layer_norm as tln  # noqa: E402
from kernel_checks import poison_outputs, SEED, assert_fp64_rule  # noqa: E402,F401  (poison_outputs: autouse)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every input is drawn from a seeded generator; set SKIPKERNELS_TEST_SEED to draw other ones.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 64), (2, 17, 96), (1, 77, 64)]


def _inputs(shape, dtype, affine=True, seed=0):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    n = shape[-1]
    # A non-zero mean and spread exercise the centring; weights around 1 keep outputs O(1).
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype) if affine else None
    b = (0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype) if affine else None
    return x, w, b


def _ln64(s, w, b, eps=1e-5):
    return F.layer_norm(s.double(), (s.shape[-1],), None if w is None else w.double(),
                        None if b is None else b.double(), eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_forward(shape, dtype, affine):
    x, w, b = _inputs(shape, dtype, affine)
    y = tln.layer_norm(x, w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert_fp64_rule(y, ops_ln.layer_norm_reference(x, w, b, 1e-5), _ln64(x, w, b), "layer_norm")


def _randn(shape, seed):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)


def _grads(fn, inputs, gouts):
    inputs = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, gouts) if g is not None)
    loss.backward()
    return [None if t is None else t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_backward(shape, dtype):
    x, w, b = _inputs(shape, dtype, seed=2)
    gy = _randn(shape, seed=7)
    fused = _grads(lambda x, w, b: tln.layer_norm(x, w, b, 1e-5), (x, w, b), (gy,))
    ref = _grads(lambda x, w, b: ops_ln.layer_norm_reference(x, w, b, 1e-5), (x, w, b), (gy,))
    exact = _grads(lambda x, w, b: _ln64(x, w, b), (x.double(), w.double(), b.double()), (gy,))
    for name, gf, gr, ge in zip("xwb", fused, ref, exact):
        assert gf.dtype == dtype
        assert_fp64_rule(gf, gr, ge, f"d{name}")


def test_saved_state_is_minimal():
    x, w, b = _inputs((2, 17, 64), torch.float32, seed=4)
    x.requires_grad_(True)
    y = tln.layer_norm(x, w, b, 1e-5)
    saved = y.grad_fn.saved_tensors
    # The input, the weight and two fp32 scalars per row: no x̂.
    per_row = [t for t in saved if t is not None and t.dim() == 1 and t.shape[0] == 34]
    assert len(per_row) == 2 and all(t.dtype == torch.float32 for t in per_row)
    assert sum(t.numel() for t in saved if t is not None) == 34 * 64 + 64 + 2 * 34


def test_dispatch_uses_triton():
    x, w, b = _inputs((3, 64), torch.float32, seed=5)
    x.requires_grad_(True)
    y = ops_ln.layer_norm(x, w, b, 1e-5, backend="triton")
    assert type(y.grad_fn).__name__ == "_LayerNormFnBackward"
    y = ops_ln.layer_norm(x, w, b, 1e-5, backend="torch")
    assert type(y.grad_fn).__name__ != "_LayerNormFnBackward"


def test_non_contiguous_input():
    x, w, b = _inputs((2, 3, 17, 32), torch.float32, seed=6)
    xt = x.transpose(1, 2)  # (B, L, H, Dh) view, as the qk-norm path produces
    y = tln.layer_norm(xt, w[:32], b[:32], 1e-6)
    torch.testing.assert_close(y, ops_ln.layer_norm_reference(xt, w[:32], b[:32], 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_normalize_with_given_statistics_reproduces_the_forward(dtype):
    """Backward recomputes normalised rows from the forward's saved statistics: bit for bit."""
    g = torch.Generator().manual_seed(SEED * 1000 + 77)
    x = (torch.randn(19, 96, generator=g) * 3 + 2).to(DEVICE, dtype)
    w, b = (1 + 0.3 * torch.randn(96, generator=g)).to(DEVICE, dtype), torch.randn(96, generator=g).to(DEVICE, dtype)
    y, mean, rstd = tln._fwd(x, w, b, 1e-5, dtype)
    again = tln.normalize_with_stats(x, w, b, mean, rstd, dtype)
    assert torch.equal(again, y)
    # Statistics are really read, not retaken: other statistics give other rows.
    assert not torch.equal(tln.normalize_with_stats(x, w, b, mean + 1, rstd, dtype), y)
