"""The MLP sub-block as one op (``skipkernels.triton.layer_norm_mlp``) vs the reference
(``layer_norm`` → fc1 + act → fc2 + residual) and an fp64 oracle."""
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first triton kernel definition; the lead's conftest may set it already.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from skipkernels.ops import layer_norm_mlp as ops_mlp  # noqa: E402
from skipkernels.triton import layer_norm_mlp as tmlp  # noqa: E402
from kernel_checks import poison_outputs, SEED, assert_fp64_rule, saved_activation_bytes  # noqa: E402,F401  (poison_outputs: autouse)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REFERENCE = ops_mlp.layer_norm_mlp_reference
NAMES = ("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2", "scale")
# (leading dims, D, hidden): 3 / 17 / 77 tokens, hidden = 4 D as in CLIP, and an odd width.
SHAPES = [((3,), 64, 256), ((2, 17), 96, 384), ((1, 77), 64, 256), ((5,), 40, 160)]


def _inputs(lead, d, hidden, dtype, seed=0, with_scale=True):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    x = torch.randn(*lead, d, generator=g) * 2 + 0.5
    ln_w, ln_b = 1 + 0.3 * torch.randn(d, generator=g), 0.2 * torch.randn(d, generator=g)
    w1, b1 = torch.randn(hidden, d, generator=g) / d ** 0.5, 0.5 * torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(d, hidden, generator=g) / hidden ** 0.5, 0.5 * torch.randn(d, generator=g)
    scale = 0.5 + torch.rand(d, generator=g)
    tensors = [t.to(DEVICE, dtype) for t in (x, ln_w, ln_b, w1, b1, w2, b2, scale)]
    if not with_scale:
        tensors[-1] = None
    return tensors


def _call(fn, act):
    return lambda x, lw, lb, w1, b1, w2, b2, scale: fn(x, lw, lb, 1e-5, w1, b1, act, w2, b2, scale)


def _double(tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "quick_gelu", "none"])
@pytest.mark.parametrize("lead,d,hidden", SHAPES)
def test_forward(lead, d, hidden, act, dtype):
    inputs = _inputs(lead, d, hidden, dtype, with_scale=act != "none")
    out = _call(tmlp.layer_norm_mlp, act)(*inputs)
    assert out.shape == (*lead, d) and out.dtype == dtype
    assert_fp64_rule(out, _call(REFERENCE, act)(*inputs), _call(REFERENCE, act)(*_double(inputs)), f"mlp[{act}]")


def _grads(fn, inputs, gout):
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    (fn(*leaves).double() * gout).sum().backward()
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "none"])
@pytest.mark.parametrize("lead,d,hidden", SHAPES[:2])
def test_backward(lead, d, hidden, act, with_scale):
    inputs = _inputs(lead, d, hidden, torch.float32, seed=1, with_scale=with_scale)
    gout = torch.randn(*lead, d, generator=torch.Generator().manual_seed(SEED * 1000 + 2),
                       dtype=torch.float64).to(DEVICE)
    fused = _grads(_call(tmlp.layer_norm_mlp, act), inputs, gout)
    ref = _grads(_call(REFERENCE, act), inputs, gout)
    exact = _grads(_call(REFERENCE, act), _double(inputs), gout)
    scale = max(t.abs().max().item() for t in exact if t is not None)
    for name, gf, gr, ge in zip(NAMES, fused, ref, exact):
        if ge is None:
            assert gf is None
            continue
        assert_fp64_rule(gf, gr, ge, f"d{name}[{act}]", scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backward_half_precision(dtype):
    inputs = _inputs((2, 17), 64, 256, dtype, seed=3)
    gout = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64).to(DEVICE)
    fused = _grads(_call(tmlp.layer_norm_mlp, "gelu"), inputs, gout)
    ref = _grads(_call(REFERENCE, "gelu"), inputs, gout)
    exact = _grads(_call(REFERENCE, "gelu"), _double(inputs), gout)
    for name, gf, gr, ge in zip(NAMES, fused, ref, exact):
        assert gf.dtype == dtype
        assert_fp64_rule(gf, gr, ge, f"{dtype} d{name}", scale=ge.abs().max().item())


def test_autocast_matches_reference():
    """fp32 residual stream and parameters under autocast: LN and residual in fp32, GEMMs in bf16."""
    inputs = _inputs((2, 17), 64, 256, torch.float32, seed=4)
    gout = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = _call(tmlp.layer_norm_mlp, "gelu")(*inputs)
        ref = _call(REFERENCE, "gelu")(*inputs)
        fused = _grads(_call(tmlp.layer_norm_mlp, "gelu"), inputs, gout)
        refg = _grads(_call(REFERENCE, "gelu"), inputs, gout)
    assert out.dtype == ref.dtype == torch.float32
    exact = _call(REFERENCE, "gelu")(*_double(inputs))
    exact_g = _grads(_call(REFERENCE, "gelu"), _double(inputs), gout)
    bf16_ulp = torch.finfo(torch.bfloat16).eps
    assert (out.double() - exact).abs().max() <= 2 * (ref.double() - exact).abs().max() + bf16_ulp * exact.abs().max()
    for name, gf, gr, ge in zip(NAMES, fused, refg, exact_g):
        assert gf.dtype == torch.float32, name
        e_f, e_r = (gf.double() - ge).abs().max().item(), (gr.double() - ge).abs().max().item()
        assert e_f <= 2 * e_r + bf16_ulp * ge.abs().max().item(), f"d{name}: {e_f:.3g} vs {e_r:.3g}"


def test_keeps_pre_activation_not_activation():
    """Backward keeps x, two fp32 row statistics and fc1's pre-activation; the reference also
    keeps the LN output and the activation output."""
    inputs = _inputs((4, 17), 64, 256, torch.float32, seed=5)
    params = [t.requires_grad_(True) for t in inputs[1:]]
    x = inputs[0].requires_grad_(True)

    def saved_bytes(fn):
        return saved_activation_bytes(lambda: _call(fn, "gelu")(x, *params), params)

    rows, d, hidden = 4 * 17, 64, 256
    fused, reference = saved_bytes(tmlp.layer_norm_mlp), saved_bytes(REFERENCE)
    assert fused <= 4 * (rows * d + 2 * rows + rows * hidden + rows * d)  # x, stats, z, y (LayerScale)
    assert reference - fused >= 4 * rows * hidden  # the activation output is not kept


def test_no_grad_keeps_nothing():
    inputs = _inputs((3,), 64, 256, torch.float32)
    inputs[3].requires_grad_(True)
    with torch.no_grad():
        out = _call(tmlp.layer_norm_mlp, "gelu")(*inputs)
    assert out.grad_fn is None


def test_bad_arguments():
    x, lw, lb, w1, b1, w2, b2, scale = _inputs((3,), 64, 256, torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        tmlp.layer_norm_mlp(x, lw, lb, 1e-5, w1, b1, "gelu", w2[:, :128], b2, scale)
    with pytest.raises(ValueError, match="scale"):
        tmlp.layer_norm_mlp(x, lw, lb, 1e-5, w1, b1, "gelu", w2, b2, scale[:3])
    with pytest.raises(ValueError, match="activation"):
        tmlp.layer_norm_mlp(x, lw, lb, 1e-5, w1, b1, "relu", w2, b2, scale)
    with pytest.raises(TypeError, match="fc2's weight"):
        tmlp.layer_norm_mlp(x, lw, lb, 1e-5, w1, b1, "gelu", w2.double(), b2, scale)


def test_dispatch():
    inputs = _inputs((2, 17), 64, 256, torch.float32, seed=6)
    inputs[3].requires_grad_(True)
    fused = ops_mlp.layer_norm_mlp(*inputs[:3], 1e-5, *inputs[3:5], "gelu", *inputs[5:], backend="triton")
    assert type(fused.grad_fn).__name__ == "_LayerNormMlpFnBackward"
    ref = ops_mlp.layer_norm_mlp(*inputs[:3], 1e-5, *inputs[3:5], "gelu", *inputs[5:], backend="torch")
    torch.testing.assert_close(fused, ref)
    # No GPU measurement for CPU tensors: auto runs the reference composition.
    auto = ops_mlp.layer_norm_mlp(*inputs[:3], 1e-5, *inputs[3:5], "gelu", *inputs[5:], backend="auto")
    assert type(auto.grad_fn).__name__ == "AddBackward0"


@pytest.mark.parametrize("act", ["gelu", "none"])
def test_gpu_tiles_and_half_path(act):
    """Both GEMM kernels (LN prologue; residual epilogue) the way a GPU runs them, under the
    interpreter: several row / column / K tiles with grouped ordering and partial edges, and
    fp16 dots without the interpreter's upcast."""
    import skipkernels.triton as skt
    if DEVICE != "cpu":
        pytest.skip("on a GPU every test already takes this path")
    tile = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=2)  # several tiles, grouped, partial edges
    with skt.launch_settings(gpu_path=True, interpreter_gemm_tile=tile):
        _gpu_tiles_and_half_path(act)


def _gpu_tiles_and_half_path(act):
    inputs = _inputs((3, 17), 96, 384, torch.float16, seed=7)
    gout = torch.randn(3, 17, 96, generator=torch.Generator().manual_seed(SEED + 8), dtype=torch.float64).to(DEVICE)
    out = _call(tmlp.layer_norm_mlp, act)(*inputs)
    assert_fp64_rule(out, _call(REFERENCE, act)(*inputs), _call(REFERENCE, act)(*_double(inputs)), "gpu-path out")
    fused = _grads(_call(tmlp.layer_norm_mlp, act), inputs, gout)
    ref = _grads(_call(REFERENCE, act), inputs, gout)
    exact = _grads(_call(REFERENCE, act), _double(inputs), gout)
    for name, gf, gr, ge in zip(NAMES, fused, ref, exact):
        assert_fp64_rule(gf, gr, ge, f"gpu-path d{name}", scale=ge.abs().max().item())
