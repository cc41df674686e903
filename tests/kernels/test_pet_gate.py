import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from skipkernels.ops import pet_gate  # noqa: E402
from skipkernels.ops.pet_gate import gated_update, gated_update_reference  # noqa: E402
from skipkernels.triton import pet_gate as kernel  # noqa: E402
from kernel_checks import poison_outputs  # noqa: E402,F401  (poison_outputs: autouse)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def nonzero(*shape, dtype=torch.float32, gen=None):
    """Random values in ±[0.1, 1]: never zero, so a dropped term always shows."""
    mag = torch.rand(*shape, generator=gen) * 0.9 + 0.1
    sign = torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0)
    return (mag * sign).to(device=DEVICE, dtype=dtype)


def gate_shapes(b, n, d):
    return {"token_channel": (b, n, d), "token": (b, n, 1), "channel": (d,), "sample": (b, 1, 1)}


def _inputs(shape, gshape, dtype, with_x=True, with_dh=True, tensor_scale=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = nonzero(*shape, dtype=dtype, gen=gen) if with_x else None
    h = nonzero(*shape, dtype=dtype, gen=gen)
    dh = nonzero(*shape, dtype=dtype, gen=gen) if with_dh else None
    g = nonzero(*gshape, dtype=dtype, gen=gen)
    s = torch.tensor(1.37, device=DEVICE) if tensor_scale else 1.37
    dout = nonzero(*shape, dtype=dtype, gen=gen)
    return x, h, dh, g, s, dout


def _run(fn, x, h, dh, g, s, dout, dtype=None):
    """Output and gradients of ``fn`` on leaf copies of the inputs (optionally cast to dtype)."""
    def leaf(t):
        if t is None or not isinstance(t, torch.Tensor):
            return t
        t = t.detach().to(dtype or t.dtype)
        return t.requires_grad_()
    args = [leaf(t) for t in (x, h, dh, g, s)]
    out = fn(*args)
    wrt = [t for t in args if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(out, wrt, dout.to(out.dtype))
    return out, grads


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_against_fp64(dtype, shape, gshape, **kw):
    x, h, dh, g, s, dout = _inputs(shape, gshape, dtype, **kw)
    ref64, ref64_grads = _run(gated_update_reference, x, h, dh, g, s, dout, dtype=torch.float64)
    eager, eager_grads = _run(gated_update_reference, x, h, dh, g, s, dout)
    fused, fused_grads = _run(lambda *a: gated_update(*a, backend="triton"), x, h, dh, g, s, dout)
    assert fused.dtype == eager.dtype and fused.shape == eager.shape
    eps = torch.finfo(dtype).eps
    pairs = [(fused, eager, ref64)] + list(zip(fused_grads, eager_grads, ref64_grads))
    for got, plain, exact in pairs:
        assert got.shape == exact.shape and got.dtype == plain.dtype
        assert torch.isfinite(got).all()
        # The fused op may be at most twice as far from fp64 as plain PyTorch in the same dtype
        # (plus one unit in the last place at the result's magnitude).
        floor = eps * exact.abs().max().item()
        assert _max_err(got, exact) <= 2 * _max_err(plain, exact) + floor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 33), (3, 5, 300), (1, 1, 1)])
@pytest.mark.parametrize("gate", ["token_channel", "token", "channel", "sample"])
def test_kernel_matches_reference(dtype, shape, gate):
    _check_against_fp64(dtype, shape, gate_shapes(*shape)[gate])


@pytest.mark.parametrize("gate", ["token_channel", "token", "channel", "sample"])
def test_kernel_tensor_scale_gets_a_gradient(gate):
    shape = (2, 9, 40)
    _check_against_fp64(torch.float32, shape, gate_shapes(*shape)[gate], tensor_scale=True)


@pytest.mark.parametrize("with_x,with_dh", [(False, True), (True, False), (False, False)])
def test_kernel_optional_terms(with_x, with_dh):
    shape = (2, 6, 24)
    _check_against_fp64(torch.float32, shape, (2, 6, 1), with_x=with_x, with_dh=with_dh)


@pytest.mark.parametrize("gshape", [(1, 6, 24), (6, 24), (1, 1, 1)])
def test_kernel_other_broadcasts(gshape):
    _check_against_fp64(torch.float32, (2, 6, 24), gshape)


@pytest.mark.parametrize("gate", ["token_channel", "channel", "sample"])
def test_kernel_bfloat16(gate):
    # Under the interpreter bf16 is only loaded and upcast; results are rounded by torch.
    shape = (2, 5, 24)
    _check_against_fp64(torch.bfloat16, shape, gate_shapes(*shape)[gate])


def test_kernel_two_dim_inputs():
    _check_against_fp64(torch.float16, (11, 19), (19,))


def test_kernel_column_partials_over_many_row_groups(monkeypatch):
    # A per-channel gate sums its gradient over rows in row groups; force several row blocks per
    # group so the in-kernel accumulation loop runs more than once.
    monkeypatch.setattr(kernel, "_blocks", lambda m, d: (4, 16))
    monkeypatch.setattr(kernel, "_MAX_ROW_GROUPS", 2)
    _check_against_fp64(torch.float32, (3, 10, 40), (40,))


def test_kernel_mixed_dtypes_promote_like_torch():
    x, h, dh, g, s, dout = _inputs((2, 5, 12), (2, 5, 1), torch.float16)
    g = g.float()
    eager, eager_grads = _run(gated_update_reference, x, h, dh, g, s, dout)
    fused, fused_grads = _run(lambda *a: gated_update(*a, backend="triton"), x, h, dh, g, s, dout)
    assert fused.dtype == eager.dtype == torch.float32
    for a, b in zip(fused_grads, eager_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_kernel_rejects_mismatched_shapes():
    h = nonzero(2, 3, 4)
    with pytest.raises(ValueError):
        gated_update(nonzero(2, 3, 5), h, None, nonzero(4), 1.0, backend="triton")


def test_auto_and_torch_backends_use_the_reference(monkeypatch):
    import dataclasses

    from skipkernels.ops import op

    @dataclasses.dataclass(frozen=True)
    class NoKernel(op.Triton):
        def load(self):
            raise AssertionError("the Triton kernel must not be used without a measurement")
    monkeypatch.setattr(pet_gate, "GATED_UPDATE", dataclasses.replace(
        pet_gate.GATED_UPDATE, impls=(NoKernel("pet_gate", "gated_update"),), _bound={}))
    x, h, dh, g, s, _ = _inputs((2, 3, 8), (8,), torch.float32)
    for backend in ("auto", "torch", None):
        out = gated_update(x, h, dh, g, s, backend=backend)
        assert torch.equal(out, x + (g * s) * (h + dh))


def test_vlpet_modifier_on_the_kernel_matches_reference():
    from skipkernels.pet.modules import VLPETModifier
    torch.manual_seed(0)
    for granularity in ("large", "middle_x", "middle_y", "small"):
        mod = VLPETModifier(16, granularity, rank=8, heads=2, scale=0.7).to(DEVICE)
        with torch.no_grad():
            for p in mod.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
        x, h = nonzero(2, 5, 16), nonzero(2, 5, 16)
        ref = mod(x, h)
        mod.backend = "triton"
        torch.testing.assert_close(mod(x, h), ref, rtol=1e-5, atol=1e-6)
