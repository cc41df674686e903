"""Triton kernels compiled for a GPU at full ViT-B/16 shapes (image 197x768, 12 heads; text
77x512, 8 heads, truncated and pooled), fp32 / fp16 / bf16, against an fp64 oracle with the same
rule as the CPU tests: error at most 2x PyTorch's own in the same dtype, plus a few ulps.
Skipped without a GPU (the CPU tests cover the same logic under the interpreter at small shapes)."""
import copy

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytest.importorskip("triton")

import skipkernels.triton as skt  # noqa: E402
from skipkernels import use_backend  # noqa: E402
from skipkernels._compat import import_open_clip  # noqa: E402
from skipkernels.ops import attention as ops_attn  # noqa: E402
from skipkernels.ops import layer_norm as ops_ln  # noqa: E402
from skipkernels.ops import layer_norm_linear as ops_lnl  # noqa: E402
from skipkernels.ops import layer_norm_mlp as ops_mlp  # noqa: E402
from skipkernels.ops import linear as ops_lin  # noqa: E402
from skipkernels.ops.block import block_forward  # noqa: E402
from skipkernels.triton import attention as tattn  # noqa: E402
from skipkernels.triton import layer_norm as tln  # noqa: E402
from skipkernels.triton import layer_norm_linear as tlnl  # noqa: E402
from skipkernels.triton import layer_norm_mlp as tmlp  # noqa: E402
from skipkernels.triton import linear as tlin  # noqa: E402
from kernel_checks import assert_fp64_rule  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = {"image": (4 * 197, 768), "text": (100 * 77, 512), "text_trunc": (100 * 24, 512)}


@pytest.fixture(autouse=True)
def _poison_and_no_tf32():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: fp32 GEMMs in full fp32
    with skt.launch_settings(poison=True):
        yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed), device=DEV) * scale).to(dtype)


def _grads(fn, inputs, gout):
    inputs = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gout = gout if isinstance(gout, tuple) else (gout,)
    sum((o.double() * g).sum() for o, g in zip(outs, gout)).backward()
    return [None if t is None else t.grad for t in inputs]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tower", list(TOKENS))
def test_layer_norm_vit_shapes(tower, dtype):
    m, d = TOKENS[tower]
    x = _randn((m, d), 1, dtype, 2.0)
    w, b = (1 + _randn((d,), 3, scale=0.5)).to(dtype), _randn((d,), 4, dtype, 0.5)
    gy = _randn((m, d), 6, torch.float64)
    args = (x, w, b)
    fused = _grads(lambda *a: tln.layer_norm(*a, 1e-5), args, gy)
    ref = _grads(lambda *a: ops_ln.layer_norm_reference(*a, 1e-5), args, gy)
    ex = _grads(lambda x, w, b: F.layer_norm(x, (d,), w, b, 1e-5), [t.double() for t in args], gy)
    for name, gf, gr, ge in zip(("x", "w", "b"), fused, ref, ex):
        assert_fp64_rule(gf, gr, ge, f"d{name}")
    y = tln.layer_norm(x, w, b, 1e-5)
    assert_fp64_rule(y, ops_ln.layer_norm_reference(x, w, b, 1e-5),
                     F.layer_norm(x.double(), (d,), w.double(), b.double(), 1e-5), "layer_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("tower", ["image", "text_trunc"])
def test_fc1_vit_shapes(tower, act, dtype):
    m, d = TOKENS[tower]
    x, w, b = _randn((m, d), 1, dtype), _randn((4 * d, d), 2, dtype, d ** -0.5), _randn((4 * d,), 3, dtype)
    gout = _randn((m, 4 * d), 4, torch.float64)
    fused = _grads(lambda *a: tlin.linear_act(*a, act), (x, w, b), gout)
    ref = _grads(lambda *a: ops_lin.linear_act_reference(*a, act), (x, w, b), gout)
    ex = _grads(lambda *a: ops_lin.linear_act_reference(*a, act), (x.double(), w.double(), b.double()), gout)
    out = tlin.linear_act(x, w, b, act)
    assert_fp64_rule(out, ops_lin.linear_act_reference(x, w, b, act),
                     ops_lin.linear_act_reference(x.double(), w.double(), b.double(), act), "fc1")
    for name, gf, gr, ge in zip(("x", "W", "b"), fused, ref, ex):
        assert_fp64_rule(gf, gr, ge, f"fc1 d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("proj", ["qkv", "fc1"])
@pytest.mark.parametrize("tower", ["image", "text_trunc"])
def test_layer_norm_linear_vit_shapes(tower, proj, dtype):
    """LN fused into the QKV / fc1 GEMM prologue, forward and every gradient."""
    m, d = TOKENS[tower]
    n, act = (3 * d, "none") if proj == "qkv" else (4 * d, "gelu")
    x = (_randn((m, d), 1, scale=2.0) + 1.0).to(dtype)
    lw, lb = (1 + _randn((d,), 2, scale=0.3)).to(dtype), _randn((d,), 3, dtype, 0.2)
    w, b = _randn((n, d), 4, dtype, d ** -0.5), _randn((n,), 5, dtype, 0.5)
    args = (x, lw, lb, w, b)
    ref_fn = ops_lnl.layer_norm_linear_reference
    out = tlnl.layer_norm_linear(x, lw, lb, 1e-5, w, b, act)
    exact_args = [t.double() for t in args]
    assert_fp64_rule(out, ref_fn(x, lw, lb, 1e-5, w, b, act),
                     ref_fn(*exact_args[:3], 1e-5, *exact_args[3:], act), f"{proj} output")
    gout = _randn((m, n), 6, torch.float64)
    split = lambda fn: (lambda x, lw, lb, w, b: fn(x, lw, lb, 1e-5, w, b, act))  # noqa: E731
    fused = _grads(split(tlnl.layer_norm_linear), args, gout)
    ref = _grads(split(ref_fn), args, gout)
    ex = _grads(split(ref_fn), exact_args, gout)
    for name, gf, gr, ge in zip(("x", "ln_w", "ln_b", "W", "b"), fused, ref, ex):
        assert_fp64_rule(gf, gr, ge, f"{proj} d{name}", scale=ge.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tower", ["image", "text_trunc"])
def test_layer_norm_mlp_vit_shapes(tower, dtype):
    """The MLP sub-block op (keeps fc1's pre-activation, recomputes GELU in backward)."""
    m, d = TOKENS[tower]
    x = (_randn((m, d), 1, scale=2.0) + 0.5).to(dtype)
    lw, lb = (1 + _randn((d,), 2, scale=0.3)).to(dtype), _randn((d,), 3, dtype, 0.2)
    w1, b1 = _randn((4 * d, d), 4, dtype, d ** -0.5), _randn((4 * d,), 5, dtype, 0.5)
    w2, b2 = _randn((d, 4 * d), 6, dtype, (4 * d) ** -0.5), _randn((d,), 7, dtype, 0.5)
    scale = (0.5 + _randn((d,), 8).abs()).to(dtype)
    args = (x, lw, lb, w1, b1, w2, b2, scale)
    call = lambda fn: (lambda x, lw, lb, w1, b1, w2, b2, s: fn(x, lw, lb, 1e-5, w1, b1, "gelu", w2, b2, s))  # noqa: E731
    exact_args = [t.double() for t in args]
    assert_fp64_rule(call(tmlp.layer_norm_mlp)(*args), call(ops_mlp.layer_norm_mlp_reference)(*args),
                     call(ops_mlp.layer_norm_mlp_reference)(*exact_args), "mlp output")
    gout = _randn((m, d), 9, torch.float64)
    fused = _grads(call(tmlp.layer_norm_mlp), args, gout)
    ref = _grads(call(ops_mlp.layer_norm_mlp_reference), args, gout)
    ex = _grads(call(ops_mlp.layer_norm_mlp_reference), exact_args, gout)
    for name, gf, gr, ge in zip(("x", "ln_w", "ln_b", "w1", "b1", "w2", "b2", "scale"), fused, ref, ex):
        assert_fp64_rule(gf, gr, ge, f"mlp d{name}", scale=ge.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", ["out_proj", "fc2"])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_linear_residual_vit_shapes(tower, layer, with_scale, dtype):
    m, d = TOKENS[tower]
    k = d if layer == "out_proj" else 4 * d
    x, w, b = _randn((m, k), 1, dtype), _randn((d, k), 2, dtype, k ** -0.5), _randn((d,), 3, dtype)
    res = _randn((m, d), 4, dtype)
    scale = (0.5 + _randn((d,), 5).abs()).to(dtype) if with_scale else None
    args = (x, w, b, res, scale)
    out = tlin.linear_residual(*args)
    ref64 = ops_lin.linear_residual_reference(*[None if t is None else t.double() for t in args])
    assert_fp64_rule(out, ops_lin.linear_residual_reference(*args), ref64, layer)
    gout = _randn((m, d), 6, torch.float64)
    fused = _grads(tlin.linear_residual, args, gout)
    ref = _grads(ops_lin.linear_residual_reference, args, gout)
    ex = _grads(ops_lin.linear_residual_reference, [None if t is None else t.double() for t in args], gout)
    for name, gf, gr, ge in zip(("x", "W", "b", "res", "scale"), fused, ref, ex):
        if gr is not None:
            assert_fp64_rule(gf, gr, ge, f"{layer} d{name}")


ATTN_CASES = [  # (B, H, Lq, Lk, Dh, kind)
    (4, 12, 197, 197, 64, "none"),
    (100, 8, 77, 77, 64, "causal"),
    (100, 8, 24, 24, 64, "causal"),
    (100, 8, 77, 77, 64, "text_mask"),
    (100, 8, 1, 77, 64, "key_limit"),
    (4, 12, 1, 197, 64, "none"),
    (8, 16, 77, 77, 32, "causal"),
    (4, 4, 197, 197, 32, "bool_padding"),
]


def _attn_kwargs(b, lk, kind, dtype):
    """(kwargs in dtype, kwargs in fp64) for one attention case of ATTN_CASES."""
    if kind == "causal":
        return {"causal": True}, {"causal": True}
    if kind == "text_mask":
        mask = torch.full((lk, lk), float("-inf"), device=DEV).triu(1)
        return {"attn_mask": mask.to(dtype)}, {"attn_mask": mask.double()}
    if kind == "key_limit":
        limit = torch.randint(1, lk + 1, (b,), generator=_gen(4), device=DEV)
        return {"key_limit": limit}, {"key_limit": limit}
    if kind == "bool_padding":
        keep = torch.arange(lk, device=DEV)[None, None, None, :] < torch.randint(1, lk + 1, (b, 1, 1, 1), generator=_gen(5), device=DEV)
        return {"attn_mask": keep}, {"attn_mask": keep}
    return {}, {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,lq,lk,dh,kind", ATTN_CASES)
def test_attention_vit_shapes(b, h, lq, lk, dh, kind, dtype):
    q = _randn((b, h, lq, dh), 1, dtype, 1.5)
    k, v = _randn((b, h, lk, dh), 2, dtype, 1.5), _randn((b, h, lk, dh), 3, dtype)
    kw, kw64 = _attn_kwargs(b, lk, kind, dtype)
    out = tattn.attention(q, k, v, **kw)
    ref64 = ops_attn.attention_reference(q.double(), k.double(), v.double(), **kw64)
    assert_fp64_rule(out, ops_attn.attention_reference(q, k, v, **kw), ref64, f"attention[{kind}]")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,lq,lk,dh,kind", ATTN_CASES)
def test_attention_backward_vit_shapes(b, h, lq, lk, dh, kind, dtype):
    """The FlashAttention-2 backward kernels vs PyTorch's SDPA backward, against fp64."""
    q = _randn((b, h, lq, dh), 1, dtype, 1.5)
    k, v = _randn((b, h, lk, dh), 2, dtype, 1.5), _randn((b, h, lk, dh), 3, dtype)
    kw, kw64 = _attn_kwargs(b, lk, kind, dtype)
    gout = _randn((b, h, lq, dh), 6, torch.float64)
    fused = _grads(lambda *a: tattn.attention(*a, **kw), (q, k, v), gout)
    ref = _grads(lambda *a: ops_attn.attention_reference(*a, **kw), (q, k, v), gout)
    ex = _grads(lambda *a: ops_attn.attention_reference(*a, **kw64), (q.double(), k.double(), v.double()), gout)
    for name, gf, gr, ge in zip("qkv", fused, ref, ex):
        assert_fp64_rule(gf, gr, ge, f"attention[{kind}] d{name}")


@pytest.mark.parametrize("tower", ["image", "text"])
def test_vit_b_block_fp32(tower):
    """A full-width block: Triton backend vs reference vs the module's own fp64 forward."""
    open_clip = import_open_clip()
    width, heads, length = (768, 12, 197) if tower == "image" else (512, 8, 77)
    torch.manual_seed(0)
    block = open_clip.transformer.ResidualAttentionBlock(width, heads).to(DEV)
    causal = tower == "text"
    x = _randn((4, length, width), 1)
    gout = _randn((4, length, width), 2, torch.float64)
    results = {}
    for backend in ("triton", "torch"):
        xb = x.clone().requires_grad_(True)
        block.zero_grad(set_to_none=True)
        with use_backend(backend):
            out = block_forward(block, xb, causal=causal)
        (out.double() * gout).sum().backward()
        results[backend] = (out.detach(), [xb.grad] + [p.grad.clone() for p in block.parameters()])
    block64 = copy.deepcopy(block).double()
    x64 = x.double().requires_grad_(True)
    mask = torch.full((length, length), float("-inf"), device=DEV, dtype=torch.float64).triu(1) if causal else None
    out64 = block64(x64, attn_mask=mask)
    (out64 * gout).sum().backward()
    grads64 = [x64.grad] + [p.grad for p in block64.parameters()]
    assert_fp64_rule(results["triton"][0], results["torch"][0], out64, "block output")
    scale = max(g.abs().max().item() for g in grads64)
    for gt, gr, g64 in zip(results["triton"][1], results["torch"][1], grads64):
        assert_fp64_rule(gt, gr, g64, "block grad", scale=scale)


def test_attention_more_than_65535_batch_heads():
    """batch x heads goes on grid axis 0: CUDA caps axis 1 at 65535 programs."""
    b, h, l, dh = 8200, 8, 5, 32  # 65,600 (batch, head) pairs
    q, k, v = (_randn((b, h, l, dh), i, torch.float16) for i in (1, 2, 3))
    q.requires_grad_(True)
    out = tattn.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, ops_attn.attention_reference(q, k, v, causal=True), rtol=2e-3, atol=2e-3)
    (dq,) = torch.autograd.grad(out.float().sum(), q)
    (dq_ref,) = torch.autograd.grad(ops_attn.attention_reference(q, k, v, causal=True).float().sum(), q)
    torch.testing.assert_close(dq, dq_ref, rtol=2e-2, atol=2e-3)
