import os

import torch

if not torch.cuda.is_available():
    # Must precede the first triton kernel definition; the lead's conftest may set it already.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from skipkernels.ops import attention as ops_attn  # noqa: E402
from skipkernels.triton import attention as tattn  # noqa: E402
from kernel_checks import poison_outputs, SEED, assert_fp64_rule  # noqa: E402,F401  (poison_outputs: autouse)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every input is drawn from a seeded generator; set SKIPKERNELS_TEST_SEED to draw other ones.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, L, Dh): odd lengths (one, several and a partial key tile), both supported head dims.
SHAPES = [(2, 2, 3, 32), (1, 2, 17, 64), (2, 2, 77, 32), (1, 1, 197, 64)]


def _qkv(shape, dtype, lq=None, seed=0):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    b, h, l, d = shape
    # Scaled so some rows have peaked softmaxes (large logits) and others flat ones.
    q = torch.randn(b, h, l if lq is None else lq, d, generator=g) * 1.5
    k = torch.randn(b, h, l, d, generator=g) * 1.5
    v = torch.randn(b, h, l, d, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _mask_cases(b, h, l, dtype, seed):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    causal_float = torch.full((l, l), float("-inf")).triu(1)  # open_clip's text mask
    return {
        "none": {},
        "causal": {"causal": True},
        "key_limit": {"key_limit": torch.randint(1, l + 1, (b,), generator=g)},
        "key_limit_one": {"key_limit": torch.ones(b, dtype=torch.long)},  # each softmax is exactly 1
        "float_LL": {"attn_mask": causal_float + torch.randn(l, l, generator=g)},
        "float_B1LL": {"attn_mask": torch.randn(b, 1, l, l, generator=g)},
        "bool_BHLL": {"attn_mask": torch.rand(b, h, l, l, generator=g) > 0.3},
        "bool_B11L": {"attn_mask": torch.arange(l)[None, None, None, :] < torch.randint(1, l + 1, (b, 1, 1, 1), generator=g)},
    }


def _to(kw, dtype=None):
    out = {}
    for name, val in kw.items():
        if isinstance(val, torch.Tensor):
            val = val.to(DEVICE)
            if dtype is not None and val.is_floating_point():
                val = val.to(dtype)
        out[name] = val
    return out


MODES = ["none", "causal", "key_limit", "float_LL", "float_B1LL", "bool_BHLL", "bool_B11L"]


# The ViT length runs unmasked and with a padding mask only, to keep interpreter time small.
FORWARD_CASES = [(s, m) for s in SHAPES for m in MODES if s[2] != 197 or m in ("none", "bool_B11L")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,mode", FORWARD_CASES)
def test_attention_forward(shape, mode, dtype):
    q, k, v = _qkv(shape, dtype, seed=MODES.index(mode))
    kw = _to(_mask_cases(shape[0], shape[1], shape[2], dtype, seed=1)[mode])
    out = tattn.attention(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    ref = ops_attn.attention_reference(q, k, v, **kw)
    ref64 = ops_attn.attention_reference(q.double(), k.double(), v.double(), **_to(kw, torch.float64))
    assert_fp64_rule(out, ref, ref64, f"attention[{mode}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("l", [3, 17, 77])
def test_pooled_query_key_limit(l, dtype):
    """Last-block pruning: one query per sample over all keys, keys >= key_limit[b] masked."""
    q, k, v = _qkv((3, 2, l, 32), dtype, seed=l)
    pos = torch.tensor([0, l - 1, l // 2], device=DEVICE)
    rows = torch.arange(3, device=DEVICE)
    q1 = q[rows, :, pos].unsqueeze(2)  # (B, H, 1, Dh): the pooled token's query
    limit = pos + 1
    out = tattn.attention(q1, k, v, key_limit=limit)
    ref64 = ops_attn.attention_reference(q1.double(), k.double(), v.double(), key_limit=limit)
    assert_fp64_rule(out, ops_attn.attention_reference(q1, k, v, key_limit=limit), ref64, "pooled")
    # That row of full causal attention, in exact arithmetic: the pruning is exact in math, not in
    # fp32 summation order (the kernels visit other key tiles), so hold it to the same fp64 rule.
    full64 = ops_attn.attention_reference(q.double(), k.double(), v.double(), causal=True)
    full = ops_attn.attention_reference(q, k, v, causal=True)
    assert_fp64_rule(out[:, :, 0], full[rows, :, pos], full64[rows, :, pos], "pooled vs full causal row")


def test_fully_masked_rows_are_zero():
    q, k, v = _qkv((2, 2, 17, 32), torch.float32, seed=3)
    mask = torch.ones(2, 1, 17, 17, dtype=torch.bool, device=DEVICE)
    mask[0, :, 5] = False  # row 5 of sample 0 sees no key
    out = tattn.attention(q, k, v, attn_mask=mask)
    ref = ops_attn.attention_reference(q, k, v, attn_mask=mask)
    assert torch.all(out[0, :, 5] == 0)
    torch.testing.assert_close(out, ref)
    out = tattn.attention(q, k, v, key_limit=torch.tensor([0, 17], device=DEVICE))
    assert torch.all(out[0] == 0) and not torch.isnan(out).any()


def test_output_is_token_major_view():
    q, k, v = _qkv((2, 4, 17, 32), torch.float32, seed=4)
    out = tattn.attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # the block's reshape back to (B, L, D) is free


def test_strided_inputs_from_packed_qkv():
    """q, k, v as the block produces them: views into one (B, L, 3, H, Dh) projection."""
    g = torch.Generator().manual_seed(SEED * 1000 + 5)
    qkv = torch.randn(2, 17, 3, 2, 32, generator=g).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(tattn.attention(q, k, v, causal=True),
                               ops_attn.attention_reference(q, k, v, causal=True))


def _randn(shape, seed):
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)


def _grads(fn, inputs, gout):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    (fn(*inputs).double() * gout).sum().backward()
    return [t.grad for t in inputs]


BACKWARD_MODES = ["none", "causal", "key_limit", "float_LL", "float_B1LL", "bool_BHLL", "bool_B11L"]
# 3 and 17 tokens fit one tile; 197 spans two, so the dK/dV kernel's causal start tile, the
# dQ kernel's diagonal bound and partial tiles are all exercised.
BACKWARD_CASES = ([(l, m) for l in (3, 17) for m in BACKWARD_MODES + ["key_limit_one"]]
                  + [(197, "causal"), (197, "key_limit")])


@pytest.mark.parametrize("l,mode", BACKWARD_CASES)
def test_attention_backward(l, mode, monkeypatch):
    shape = (2, 2, l, 32)
    q, k, v = _qkv(shape, torch.float32, seed=6)
    kw = _to(_mask_cases(2, 2, l, torch.float32, seed=7)[mode])
    gout = _randn(shape, seed=9)
    ref = _grads(lambda *a: ops_attn.attention_reference(*a, **kw), (q, k, v), gout)
    exact = _grads(lambda *a: ops_attn.attention_reference(*a, **_to(kw, torch.float64)),
                   (q.double(), k.double(), v.double()), gout)
    # The Triton backward must not fall back to differentiating the reference.
    monkeypatch.setattr(ops_attn, "attention_reference", None)
    fused = _grads(lambda *a: tattn.attention(*a, **kw), (q, k, v), gout)
    for name, gf, gr, ge in zip("qkv", fused, ref, exact):
        assert_fp64_rule(gf, gr, ge, f"d{name}[{mode}]")


def test_attention_backward_peaked_rows():
    """Rows where one key takes nearly all the softmax (few keys, large logits): dS = P (dP - delta)
    is a cancellation there, so delta must come from the same P and dP as dS (and be normalised by
    that P's own sum), or dQ/dK carry errors several times PyTorch's. Many small draws, so a
    cancellation that is lucky on one machine's summation order is not lucky on all of them."""
    g = torch.Generator().manual_seed(SEED * 1000 + 30)
    for draw in range(24):
        l = (3, 5, 17)[draw % 3]
        logit_scale = (1.0, 2.0, 3.0)[draw // 3 % 3]
        q, k, v = _qkv((2, 2, l, 32), torch.float32, seed=100 + draw)
        q = q * logit_scale
        kw = {"key_limit": torch.randint(1, min(l, 4) + 1, (2,), generator=g).to(DEVICE)}
        gout = _randn((2, 2, l, 32), seed=200 + draw)
        ref = _grads(lambda *a: ops_attn.attention_reference(*a, **kw), (q, k, v), gout)
        exact = _grads(lambda *a: ops_attn.attention_reference(*a, **kw), (q.double(), k.double(), v.double()), gout)
        fused = _grads(lambda *a: tattn.attention(*a, **kw), (q, k, v), gout)
        for name, gf, gr, ge in zip("qkv", fused, ref, exact):
            assert_fp64_rule(gf, gr, ge, f"draw {draw}: d{name} (L={l}, logits x{logit_scale}, {kw['key_limit'].tolist()})")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["none", "causal", "key_limit"])
def test_attention_backward_half(mode, dtype):
    shape = (2, 2, 17, 64)
    q, k, v = _qkv(shape, dtype, seed=12)
    kw = _to(_mask_cases(2, 2, 17, dtype, seed=13)[mode])
    gout = _randn(shape, seed=14)
    fused = _grads(lambda *a: tattn.attention(*a, **kw), (q, k, v), gout)
    ref = _grads(lambda *a: ops_attn.attention_reference(*a, **kw), (q, k, v), gout)
    exact = _grads(lambda *a: ops_attn.attention_reference(*a, **_to(kw, torch.float64)),
                   (q.double(), k.double(), v.double()), gout)
    for name, gf, gr, ge in zip("qkv", fused, ref, exact):
        assert gf.dtype == dtype
        assert_fp64_rule(gf, gr, ge, f"d{name}[{mode}, {dtype}]")


@pytest.mark.parametrize("l", [3, 77])
def test_pooled_query_backward(l):
    """Last-block pruning's backward: one query per sample, keys past key_limit get zero grads."""
    q, k, v = _qkv((3, 2, l, 32), torch.float32, seed=15)
    q1 = q[:, :, :1]
    limit = torch.tensor([1, l, l // 2 + 1], device=DEVICE)
    gout = _randn(q1.shape, seed=16)
    fused = _grads(lambda *a: tattn.attention(*a, key_limit=limit), (q1, k, v), gout)
    ref = _grads(lambda *a: ops_attn.attention_reference(*a, key_limit=limit), (q1, k, v), gout)
    exact = _grads(lambda *a: ops_attn.attention_reference(*a, key_limit=limit),
                   (q1.double(), k.double(), v.double()), gout)
    for name, gf, gr, ge in zip("qkv", fused, ref, exact):
        assert_fp64_rule(gf, gr, ge, f"pooled d{name}")
    assert torch.all(fused[1][0, :, 1:] == 0) and torch.all(fused[2][0, :, 1:] == 0)


def test_fully_masked_rows_backward():
    """A row that sees no key has output 0 and passes no gradient, without NaN."""
    q, k, v = _qkv((2, 2, 17, 32), torch.float32, seed=17)
    mask = torch.rand(2, 2, 17, 17, generator=torch.Generator().manual_seed(SEED), device="cpu") > 0.3
    mask[0, :, 5] = False
    mask[1, 1] = False  # a whole head sees nothing
    mask = mask.to(DEVICE)
    gout = _randn(q.shape, seed=18)
    fused = _grads(lambda *a: tattn.attention(*a, attn_mask=mask), (q, k, v), gout)
    exact = _grads(lambda *a: ops_attn.attention_reference(*a, attn_mask=mask),
                   (q.double(), k.double(), v.double()), gout)
    for name, gf, ge in zip("qkv", fused, exact):
        assert not torch.isnan(gf).any(), name
        torch.testing.assert_close(gf.double(), ge, rtol=1e-4, atol=1e-5)
    assert torch.all(fused[0][0, :, 5] == 0) and torch.all(fused[1][1, 1] == 0)


def test_no_grad_forward_saves_nothing():
    q, k, v = _qkv((1, 2, 17, 32), torch.float32)
    q.requires_grad_(True)
    with torch.no_grad():
        out = tattn.attention(q, k, v, causal=True)
    assert out.grad_fn is None


def test_float_mask_gradient():
    q, k, v = _qkv((1, 2, 17, 32), torch.float32, seed=8)
    mask = _randn((1, 2, 17, 17), seed=10).float().requires_grad_(True)
    gout = _randn(q.shape, seed=11).float()
    out = tattn.attention(q, k, v, attn_mask=mask)
    (g_fused,) = torch.autograd.grad(out, mask, gout)
    (g_ref,) = torch.autograd.grad(ops_attn.attention_reference(q, k, v, attn_mask=mask), mask, gout)
    # Backward recomputes the reference, so the mask gradient is the reference's exactly.
    assert torch.equal(g_fused, g_ref)


def test_argument_rules_match_reference():
    q, k, v = _qkv((1, 2, 17, 32), torch.float32)
    with pytest.raises(ValueError):
        tattn.attention(q, k, v, causal=True, key_limit=torch.tensor([3]))
    with pytest.raises(ValueError):
        tattn.attention(q[:, :, :1], k, v, causal=True)


def test_dispatch_uses_triton():
    q, k, v = _qkv((1, 2, 17, 32), torch.float32)
    q.requires_grad_(True)
    out = ops_attn.attention(q, k, v, causal=True, backend="triton")
    assert type(out.grad_fn).__name__ == "_AttentionFnBackward"


GPU_PATH_CASES = [((2, 2, 77, 64), "causal"), ((2, 2, 100, 32), "none"), ((3, 2, 130, 64), "key_limit"),
                  ((2, 2, 70, 64), "bool_BHLL"), ((2, 2, 40, 128), "float_B1LL")]


@pytest.mark.parametrize("shape,mode", GPU_PATH_CASES)
def test_gpu_tiles_and_half_path(shape, mode):
    """The launch a GPU makes, run by the interpreter: the GPU tile sizes (several query and key
    tiles, partial ones) and fp16 dots without the interpreter's upcast."""
    import skipkernels.triton as skt
    if DEVICE != "cpu":
        pytest.skip("on a GPU every test already takes this path")
    with skt.launch_settings(gpu_path=True):
        _gpu_tiles_and_half_path(shape, mode)


def _gpu_tiles_and_half_path(shape, mode):
    q, k, v = _qkv(shape, torch.float16, seed=20)
    kw = _to(_mask_cases(shape[0], shape[1], shape[2], torch.float16, seed=21)[mode])
    gout = _randn(shape, seed=22)
    fused_out = tattn.attention(q, k, v, **kw)
    fused = _grads(lambda *a: tattn.attention(*a, **kw), (q, k, v), gout)
    ref = _grads(lambda *a: ops_attn.attention_reference(*a, **kw), (q, k, v), gout)
    exact = _grads(lambda *a: ops_attn.attention_reference(*a, **_to(kw, torch.float64)),
                   (q.double(), k.double(), v.double()), gout)
    out64 = ops_attn.attention_reference(q.double(), k.double(), v.double(), **_to(kw, torch.float64))
    assert_fp64_rule(fused_out, ops_attn.attention_reference(q, k, v, **kw), out64, f"gpu-path out[{mode}]")
    for name, gf, gr, ge in zip("qkv", fused, ref, exact):
        assert_fp64_rule(gf, gr, ge, f"gpu-path d{name}[{mode}]")
