import os

import torch

if not torch.cuda.is_available():
    # Must precede the first triton kernel definition; the lead's conftest may set it already.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from skipkernels.ops import linear as ops_lin  # noqa: E402
from skipkernels.triton import linear as tlin  # noqa: E402
from kernel_checks import poison_outputs, SEED, assert_fp64_rule  # noqa: E402,F401  (poison_outputs: autouse)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every input is drawn from a seeded generator; set SKIPKERNELS_TEST_SEED to draw other ones.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["gelu", "gelu_tanh", "quick_gelu", "none"]
# (leading dims, K, N): odd token counts, K spanning one to several K tiles, N not a tile multiple.
SHAPES = [((3,), 64, 64), ((3,), 512, 64), ((3,), 768, 64), ((2, 17), 96, 256), ((1, 77), 64, 96)]


def _inputs(lead, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5  # pre-activations O(1): every GELU regime
    b = 0.5 * torch.randn(n, generator=g)
    res = torch.randn(*lead, n, generator=g)
    scale = 0.5 + torch.rand(n, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, w, b, res, scale)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_linear_act_forward(lead, k, n, act, dtype):
    x, w, b, _, _ = _inputs(lead, k, n, dtype)
    out = tlin.linear_act(x, w, b, act)
    assert out.shape == (*lead, n) and out.dtype == dtype
    ref64 = ops_lin.linear_act_reference(x.double(), w.double(), b.double(), act)
    assert_fp64_rule(out, ops_lin.linear_act_reference(x, w, b, act), ref64, f"linear_act[{act}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("lead,k,n", SHAPES)
def test_linear_residual_forward(lead, k, n, with_scale, dtype):
    x, w, b, res, scale = _inputs(lead, k, n, dtype, seed=1)
    scale = scale if with_scale else None
    out = tlin.linear_residual(x, w, b, res, scale)
    assert out.shape == res.shape and out.dtype == dtype
    ref64 = ops_lin.linear_residual_reference(
        x.double(), w.double(), b.double(), res.double(), None if scale is None else scale.double())
    assert_fp64_rule(out, ops_lin.linear_residual_reference(x, w, b, res, scale), ref64, "linear_residual")


def test_no_bias():
    x, w, _, res, _ = _inputs((5,), 64, 48, torch.float32, seed=2)
    torch.testing.assert_close(tlin.linear_act(x, w, None, "gelu"),
                               ops_lin.linear_act_reference(x, w, None, "gelu"))
    torch.testing.assert_close(tlin.linear_residual(x, w, None, res),
                               ops_lin.linear_residual_reference(x, w, None, res))


def _randn(shape, seed):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)


def _grads(fn, inputs, gout):
    inputs = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    (fn(*inputs).double() * gout).sum().backward()
    return [None if t is None else t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("lead,k,n", [SHAPES[0], SHAPES[3]])
def test_linear_act_backward(lead, k, n, act, dtype):
    x, w, b, _, _ = _inputs(lead, k, n, dtype, seed=3)
    gout = _randn((*lead, n), seed=8)
    fused = _grads(lambda *a: tlin.linear_act(*a, act), (x, w, b), gout)
    ref = _grads(lambda *a: ops_lin.linear_act_reference(*a, act), (x, w, b), gout)
    exact = _grads(lambda *a: ops_lin.linear_act_reference(*a, act), (x.double(), w.double(), b.double()), gout)
    for name, gf, gr, ge in zip(("x", "W", "b"), fused, ref, exact):
        assert gf.shape == gr.shape and gf.dtype == dtype
        assert_fp64_rule(gf, gr, ge, f"linear_act[{act}] d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("lead,k,n", [SHAPES[1], SHAPES[3]])
def test_linear_residual_backward(lead, k, n, with_scale, dtype):
    x, w, b, res, scale = _inputs(lead, k, n, dtype, seed=4)
    scale = scale if with_scale else None
    gout = _randn((*lead, n), seed=9)
    args = (x, w, b, res, scale)
    fused = _grads(tlin.linear_residual, args, gout)
    ref = _grads(ops_lin.linear_residual_reference, args, gout)
    exact = _grads(ops_lin.linear_residual_reference, [None if t is None else t.double() for t in args], gout)
    for name, gf, gr, ge in zip(("x", "W", "b", "residual", "scale"), fused, ref, exact):
        if gr is None:
            assert gf is None
            continue
        assert gf.shape == gr.shape
        assert_fp64_rule(gf, gr, ge, f"linear_residual d{name}")


def test_scale_branch_saved_only_when_needed():
    x, w, b, res, scale = _inputs((3,), 64, 64, torch.float32, seed=5)
    x.requires_grad_(True)
    out = tlin.linear_residual(x, w, b, res, scale)  # scale needs no grad: no branch copy kept
    assert out.grad_fn.saved_tensors[-1] is None
    scale.requires_grad_(True)
    out = tlin.linear_residual(x, w, b, res, scale)
    torch.testing.assert_close(out.grad_fn.saved_tensors[-1], torch.nn.functional.linear(x, w, b))


def test_broadcast_residual():
    x, w, b, _, scale = _inputs((2, 17), 64, 64, torch.float32, seed=6)
    res = _randn((1, 17, 64), seed=10).float().requires_grad_(True)
    out = ops_lin.linear_residual(x, w, b, res, scale, backend="triton")
    ref = ops_lin.linear_residual_reference(x, w, b, res, scale)
    torch.testing.assert_close(out, ref)
    (g_fused,) = torch.autograd.grad(out.sum(), res)
    (g_ref,) = torch.autograd.grad(ref.sum(), res)
    torch.testing.assert_close(g_fused, g_ref)


def test_dispatch_uses_triton():
    x, w, b, res, _ = _inputs((3,), 64, 64, torch.float32, seed=7)
    x.requires_grad_(True)
    assert type(ops_lin.linear_act(x, w, b, "gelu", backend="triton").grad_fn).__name__ == "_LinearActFnBackward"
    assert type(ops_lin.linear_residual(x, w, b, res, backend="triton").grad_fn).__name__ == \
        "_LinearResidualFnBackward"


def test_bad_activation():
    x, w, b, _, _ = _inputs((3,), 64, 64, torch.float32)
    with pytest.raises(ValueError):
        tlin.linear_act(x, w, b, "relu")


def test_dot_precision_follows_torch_tf32_settings():
    """TF32 only where torch allows it for matmuls, read through either of torch's APIs (after
    the newer ``fp32_precision`` is used, reading the legacy ``allow_tf32`` raises). In a fresh
    process: the settings are process-wide."""
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from skipkernels.triton import dot_precision as p\n"
        "assert p(torch.float32) == 'ieee' and p(torch.bfloat16) == 'ieee'\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "assert p(torch.float32) == 'tf32' and p(torch.float16) == 'ieee'\n"
        "torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "assert p(torch.float32) == 'ieee'\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def test_kernel_names_what_it_does_not_support_and_dispatch_runs_the_reference():
    """Kernels are leaves: they refuse inputs they cannot take; under auto the op layer runs the
    reference for them, and a forced triton says why it cannot run."""
    from skipkernels.ops.policy import ALL_TRITON, KernelPolicy
    x, w, b, res, scale = _inputs((2, 17), 64, 64, torch.float32, seed=6)
    wide = _randn((3, 2, 17, 64), seed=11).float()  # widens the output
    scalar = torch.tensor(0.5)
    assert tlin.linear_residual_not_supported(x, w, b, res, scale) == []
    assert len(tlin.linear_residual_not_supported(x, w, b, wide, scalar)) == 2
    with pytest.raises(ValueError, match="widens the output"):
        tlin.linear_residual(x, w, b, wide, scale)
    out = ops_lin.linear_residual(x, w, b, wide, scalar, backend=KernelPolicy("auto", table=ALL_TRITON))
    torch.testing.assert_close(out, ops_lin.linear_residual_reference(x, w, b, wide, scalar))
    # auto where the table prefers the kernel (as on a GPU) asks the same reasons, and runs the
    # reference for the refused inputs
    assert ops_lin.LINEAR_RESIDUAL.not_supported("triton", "cuda", x, w, b, wide, scalar)
    assert ops_lin.LINEAR_RESIDUAL.not_supported("triton", "cuda", x, w, b, res, scale) == []
    with pytest.raises(ValueError, match="forced, but the Triton linear_residual kernel cannot run .* widens the output"):
        ops_lin.linear_residual(x, w, b, wide, scalar, backend="triton")
    torch.testing.assert_close(ops_lin.linear_residual(x, w, b, res, scale, backend="triton"),
                               ops_lin.linear_residual_reference(x, w, b, res, scale))


def test_launch_settings_are_scoped():
    """The poison and GPU-path aids hold inside ``launch_settings`` only (no module global to patch)."""
    import skipkernels.triton as skt
    assert skt.poison_enabled()  # this module's autouse fixture
    with skt.launch_settings(poison=False, gpu_path=True):
        assert not skt.poison_enabled() and not skt.interpreter_shortcuts()
    assert skt.poison_enabled() and torch.isnan(skt.new_empty((2,), torch.float32, "cpu")).all()
    assert skt.interpreter_shortcuts() == skt.interpreting()
