"""Whole open_clip blocks through ``ops.block.block_forward``: Triton backend vs the reference.

The fp64 oracle is the block's own ``forward`` on a float64 copy of it; both fp32 paths (Triton
kernels and the PyTorch reference ops) are measured against it, outputs and every gradient.
"""
import copy
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first triton kernel definition; the lead's conftest may set it already.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from skipkernels._compat import import_open_clip  # noqa: E402
from skipkernels import use_backend  # noqa: E402
from skipkernels.ops.block import block_forward  # noqa: E402
from kernel_checks import poison_outputs, SEED, max_error as _err, assert_fp64_rule, saved_activation_bytes  # noqa: E402,F401  (poison_outputs: autouse)

open_clip = import_open_clip()
T = open_clip.transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

BLOCKS = {
    "rab": lambda: T.ResidualAttentionBlock(64, 4),
    "rab_w96_quickgelu_ls": lambda: T.ResidualAttentionBlock(96, 3, ls_init_value=0.5, act_layer=T.QuickGELU),
    "custom": lambda: T.CustomResidualAttentionBlock(64, 4),
    "custom_all_options": lambda: T.CustomResidualAttentionBlock(
        64, 2, ls_init_value=0.5, qk_norm=True, scale_heads=True, scale_attn_inner=True,
        scale_attn=True, scale_fc=True),
}

# (block, tokens, attention kind, prune to one pooled row per sample)
CASES = [
    ("rab", 17, "none", False),
    ("rab", 77, "causal", False),
    ("rab", 77, "causal", True),     # text tower's last block: EOT row only
    ("rab", 3, "none", True),        # image tower's last block: CLS row only
    ("rab", 17, "float_mask", False),
    ("rab_w96_quickgelu_ls", 17, "causal", False),
    ("rab_w96_quickgelu_ls", 17, "none", True),
    ("custom", 17, "causal", True),
    ("custom_all_options", 17, "none", False),
    ("custom_all_options", 17, "causal", True),
]


def _make_block(name, seed):
    torch.manual_seed(SEED * 1000 + seed)
    block = BLOCKS[name]().to(DEVICE).eval()
    g = torch.Generator().manual_seed(SEED * 1000 + seed)
    with torch.no_grad():
        # Perturb every parameter (norm weights of 1, zero biases) so each one matters.
        for p in block.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(DEVICE))
    return block


def _run(block, x, kind, query_index, gout, backend):
    """Output and gradients (x first, then every parameter) of block_forward on ``backend``."""
    x = x.detach().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    length = x.shape[1]
    causal = kind == "causal"
    mask = None
    if kind == "float_mask":
        mask = torch.full((length, length), float("-inf"), device=DEVICE).triu(1)
    with use_backend(backend):
        out = block_forward(block, x, causal=causal, attn_mask=mask, query_index=query_index)
    (out.double() * gout).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in block.parameters()]


def _oracle(block, x, kind, query_index, gout):
    """The block's own forward in fp64 (pruned rows picked from the full output)."""
    block64 = copy.deepcopy(block).double()
    x64 = x.detach().double().requires_grad_(True)
    length = x.shape[1]
    mask = None
    if kind in ("causal", "float_mask"):
        mask = torch.full((length, length), float("-inf"), device=DEVICE, dtype=torch.float64).triu(1)
    out = block64(x64, attn_mask=mask)
    if query_index is not None:
        out = out[torch.arange(x.shape[0], device=DEVICE), query_index].unsqueeze(1)
    (out * gout).sum().backward()
    return out.detach(), [x64.grad] + [p.grad for p in block64.parameters()]


@pytest.mark.parametrize("name,length,kind,prune", CASES)
def test_block_matches_reference(name, length, kind, prune):
    seed = CASES.index((name, length, kind, prune))
    block = _make_block(name, seed)
    width = block.ln_1.normalized_shape[0]
    g = torch.Generator().manual_seed(SEED * 1000 + 100 + seed)
    batch = 2
    x = torch.randn(batch, length, width, generator=g).to(DEVICE)
    query_index = None
    if prune:
        # CLS (row 0) for the image tower; an EOT-like position anywhere for the text tower.
        query_index = torch.randint(0, length, (batch,), generator=g).to(DEVICE) if kind == "causal" \
            else torch.zeros(batch, dtype=torch.long, device=DEVICE)
    rows = 1 if prune else length
    gout = torch.randn(batch, rows, width, generator=g, dtype=torch.float64).to(DEVICE)

    out_t, grads_t = _run(block, x, kind, query_index, gout, "triton")
    out_r, grads_r = _run(block, x, kind, query_index, gout, "torch")
    out_64, grads_64 = _oracle(block, x, kind, query_index, gout)

    assert out_t.shape == out_64.shape == (batch, rows, width)
    assert_fp64_rule(out_t, out_r, out_64, "output")
    names = ["x"] + [n for n, _ in block.named_parameters()]
    grad_scale = max(g.abs().max().item() for g in grads_64)
    for pname, gt, gr, g64 in zip(names, grads_t, grads_r, grads_64):
        assert gt is not None and gr is not None, f"no gradient for {pname}"
        assert gt.shape == g64.shape
        assert_fp64_rule(gt, gr, g64, f"d{pname}", scale=grad_scale)


def _graph_kinds(out):
    """Names of every autograd node behind ``out``."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def test_block_uses_triton_kernels():
    """The Triton backend really runs the kernels (not a silent fallback to the reference)."""
    block = _make_block("rab", 0)
    x = torch.randn(2, 17, 64, device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        out = block_forward(block, x, causal=True)
    kinds = _graph_kinds(out)
    # LN→QKV is one fused kernel, out-proj carries the residual, the MLP is one op.
    for expected in ("_LayerNormLinearFnBackward", "_AttentionFnBackward", "_LinearResidualFnBackward",
                     "_LayerNormMlpFnBackward"):
        assert expected in kinds, f"{expected} missing from the autograd graph"
    assert "_LayerNormFnBackward" not in kinds and "_LinearActFnBackward" not in kinds


@pytest.mark.parametrize("name,length,kind,prune", [CASES[1], CASES[2], CASES[9]])
def test_block_with_unfused_layer_norm(name, length, kind, prune, monkeypatch):
    """The other composition ``auto`` may pick: the LayerNorm kernel, then the GEMM kernels."""
    import dataclasses

    from skipkernels.ops import block as ops_block
    from skipkernels.ops import layer_norm_mlp as ops_mlp

    # The fused ops without their kernels: each runs its composition of the other ops' kernels.
    unfused = dataclasses.replace(ops_block.LAYER_NORM_LINEAR, impls=(), _bound={})
    monkeypatch.setattr(ops_block, "LAYER_NORM_LINEAR", unfused)
    monkeypatch.setattr(ops_mlp, "LAYER_NORM_LINEAR", unfused)
    monkeypatch.setattr(ops_block, "LAYER_NORM_MLP", dataclasses.replace(ops_block.LAYER_NORM_MLP, impls=(), _bound={}))
    seed = CASES.index((name, length, kind, prune))
    test_block_matches_reference(name, length, kind, prune)
    block = _make_block(name, seed)
    x = torch.randn(2, length, block.ln_1.normalized_shape[0], device=DEVICE, requires_grad=True)
    with use_backend("triton"):
        out = block_forward(block, x, causal=kind == "causal")
    assert type(out.grad_fn).__name__ == "_LinearResidualFnBackward"
    assert "_LayerNormFnBackward" in _graph_kinds(out)


@pytest.mark.parametrize("kind", ["none", "causal"])
def test_block_fp16_forward(kind):
    block = _make_block("rab", 50)
    g = torch.Generator().manual_seed(SEED * 1000 + 51)
    x = torch.randn(2, 17, 64, generator=g).to(DEVICE)
    causal = kind == "causal"
    block16 = copy.deepcopy(block).half()
    with torch.no_grad():
        with use_backend("triton"):
            out_t = block_forward(block16, x.half(), causal=causal)
        with use_backend("torch"):
            out_r = block_forward(block16, x.half(), causal=causal)
        mask = torch.full((17, 17), float("-inf"), device=DEVICE, dtype=torch.float64).triu(1) if causal else None
        out_64 = copy.deepcopy(block16).double()(x.half().double(), attn_mask=mask)
    assert out_t.dtype == torch.float16
    assert_fp64_rule(out_t, out_r, out_64, "fp16 block output")


@pytest.mark.parametrize("kind,prune", [("causal", False), ("none", True)])
def test_block_under_autocast(kind, prune):
    """Under torch.autocast the Triton ops compute in the autocast dtype, as the reference's
    F.linear / SDPA do: same output dtype, errors of the same size, gradients reach fp32 params."""
    block = _make_block("rab", 60)
    g = torch.Generator().manual_seed(SEED * 1000 + 61)
    x = torch.randn(2, 17, 64, generator=g).to(DEVICE)
    query_index = torch.zeros(2, dtype=torch.long, device=DEVICE) if prune else None
    gout = torch.randn(2, 1 if prune else 17, 64, generator=g, dtype=torch.float64).to(DEVICE)
    dtype = torch.bfloat16
    results = {}
    for backend in ("triton", "torch"):
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
            results[backend] = _run(block, x, kind, query_index, gout, backend)
    out_64, grads_64 = _oracle(block, x, kind, query_index, gout)
    (out_t, grads_t), (out_r, grads_r) = results["triton"], results["torch"]
    assert out_t.dtype == out_r.dtype
    bf16_ulp = torch.finfo(dtype).eps
    for name, a, r, e, scale in [("output", out_t, out_r, out_64, out_64.abs().max().item())] + [
            ("grad", a, r, e, max(t.abs().max().item() for t in grads_64))
            for a, r, e in zip(grads_t, grads_r, grads_64)]:
        assert a.dtype == r.dtype and not torch.isnan(a).any()
        e_fused, e_torch = _err(a, e), _err(r, e)
        assert e_fused <= 2 * e_torch + bf16_ulp * scale, f"{name}: {e_fused:.3g} vs torch {e_torch:.3g}"


@pytest.mark.parametrize("kind", ["none", "causal"])
def test_block_keeps_less_for_backward(kind):
    """Saved activations of a trainable block, in units of B*L*D values: the reference ops keep
    15 (LN outputs, q/k/v, attention output, fc1 pre-activation and GELU output...), the Triton
    ops 9 (LN outputs recomputed from row statistics, the GELU output from fc1's pre-activation)."""
    block = _make_block("rab", 70)
    x = torch.randn(4, 17, 64, device=DEVICE, requires_grad=True)
    params = list(block.parameters()) + [x]
    units = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            nbytes = saved_activation_bytes(lambda: block_forward(block, x, causal=kind == "causal"), params)
        units[backend] = nbytes / (x.numel() * x.element_size())
    assert units["torch"] > 14.5 and units["triton"] < 9.5, units
