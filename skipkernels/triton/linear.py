"""GEMM with fused epilogues, in Triton.

- ``linear_act(x, W, b, act)`` = act(x Wᵀ + b) for the MLP's fc1: bias and GELU (erf or tanh) or
  QuickGELU are applied to the fp32 accumulator before the single store.
- ``linear_residual(x, W, b, residual, scale)`` = residual + scale ⊙ (x Wᵀ + b) for out-proj and
  fc2: bias, LayerScale and the residual add happen in the epilogue, so the branch output is never
  written to memory on its own.

Accumulation is fp32 and the result is rounded once (the reference rounds after the GEMM, after
the activation and after the add). fp32 inputs use IEEE fp32 dots unless torch itself allows TF32
for matmuls, so the kernels are never less precise than the reference's GEMM.

Backward (autograd Functions): the activation derivative is a Triton elementwise kernel over the
pre-activation saved by the forward kernel (the same tensor autograd would keep for ``F.gelu``);
dX, dW and db use torch matmuls / reductions (cuBLAS on GPU). For the residual form the branch
output before scaling is kept only when the LayerScale vector needs a gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from skipkernels.triton import gemm_tiles
from skipkernels.triton import (activation_code, autocast_inputs, check_tensors, current_launch_settings,
                                dot_precision, interpreter_shortcuts, interpreting, new_empty, store_dtype)



# ACT codes: skipkernels.triton.ACTIVATIONS (none 0, gelu 1, gelu_tanh 2, quick_gelu 3).
@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 z (1 + tanh(u)) = z σ(2u): no tanh needed (tl has none in every backend).
        z = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACT == 3:
        z = z * tl.sigmoid(1.702 * z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    # 1 − σ(a) is evaluated as σ(−a): subtracting from 1 would cancel for large |z|.
    if ACT == 1:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        u2 = 1.5957691216057308 * (z + 0.044715 * z * z * z)
        s = tl.sigmoid(u2)
        d = s + z * s * tl.sigmoid(-u2) * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    elif ACT == 3:
        s = tl.sigmoid(1.702 * z)
        d = s + 1.702 * z * s * tl.sigmoid(-1.702 * z)
    else:
        d = tl.full(z.shape, 1.0, tl.float32)
    return d


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order: programs that run together
    share W tiles in L2."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def bias_act_epilogue(acc, Bias, Z, rn, nmask, offs, mask, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      STORE_Z: tl.constexpr):
    """On the fp32 accumulator: + bias, store the pre-activation when backward needs it, then
    the activation."""
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if STORE_Z:
        tl.store(Z + offs, acc.to(Z.dtype.element_ty), mask=mask)
    return _act_fwd(acc, ACT)


@triton.jit(do_not_specialize=["M"])  # M = rows changes with text length / batch: one variant
def _linear_kernel(A, W, Bias, R, Scale, C, Z, M, N, K,
                   stride_am, stride_ak, stride_wn, stride_wk, stride_rm, stride_rn,
                   ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   HAS_SCALE: tl.constexpr, STORE_Z: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_ptrs = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask = mmask[:, None] & nmask[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = bias_act_epilogue(acc, Bias, Z, rn, nmask, offs, mask, ACT, HAS_BIAS, STORE_Z)
    if HAS_SCALE:
        acc *= tl.load(Scale + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        r_ptrs = R + rm[:, None].to(tl.int64) * stride_rm + rn[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + offs, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _act_fwd_kernel(Z, OUT, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, _act_fwd(z, ACT).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(G, Z, DZ, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DZ + offs, (g * _act_grad(z, ACT)).to(DZ.dtype.element_ty), mask=mask)


def _interpret_blocks(m, n, k):
    # The interpreter pays per operation, so the biggest sensible tiles are the fastest.
    return dict(BLOCK_M=min(64, max(16, triton.next_power_of_2(m))),
                BLOCK_N=min(128, max(16, triton.next_power_of_2(n))),
                BLOCK_K=min(128, max(16, triton.next_power_of_2(k))), GROUP_M=8)


def launch_gemm(kernel, name, m, n, k, args, meta, dtype, a_dtype):
    """One program per (BLOCK_M, BLOCK_N) output tile: fixed tiles under the interpreter; on a GPU
    the tile of ``gemm_tiles`` (heuristic for small M, tuned once per key otherwise)."""
    if interpreting():
        blocks = current_launch_settings().interpreter_gemm_tile or _interpret_blocks(m, n, k)
        grid = (triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"]),)
        kernel[grid](*args, **meta, **blocks)
        return

    def run(tile):
        grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
        kernel[grid](*args, **meta, **tile.launch_meta())

    run(gemm_tiles.tile_for(name, m, n, k, dtype, args[0].device, a_dtype, run))


def _gemm(x2, weight, bias, act, residual2=None, scale=None, out_dtype=None, store_z=False):
    """One fused GEMM launch. Returns (out, z) with z the pre-activation / pre-scale branch."""
    m, k = x2.shape
    n = weight.shape[0]
    dev = x2.device
    out_dtype = x2.dtype if out_dtype is None else out_dtype
    out = new_empty((m, n), store_dtype(out_dtype), dev)
    z = new_empty((m, n), store_dtype(x2.dtype), dev) if store_z else None
    if m > 0 and n > 0:
        rs = residual2.stride() if residual2 is not None else (0, 0)
        args = (x2, weight, bias, residual2, scale, out, z, m, n, k,
                x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), rs[0], rs[1])
        meta = dict(ACT=act, HAS_BIAS=bias is not None, HAS_RES=residual2 is not None,
                    HAS_SCALE=scale is not None, STORE_Z=store_z,
                    UPCAST=interpreter_shortcuts() or x2.dtype == torch.float32, PRECISION=dot_precision(x2.dtype))
        launch_gemm(_linear_kernel, "linear", m, n, k, args, meta, weight.dtype, x2.dtype)
    out = out.to(out_dtype)
    if z is not None:
        z = z.to(x2.dtype)
    return out, z


def _act_forward(z, act):
    """act(z) elementwise, rounded once to z's dtype (as the GEMM epilogue rounds it)."""
    out = new_empty(z.shape, store_dtype(z.dtype), z.device)
    numel = z.numel()
    if numel > 0:
        block = 4096 if interpreter_shortcuts() else 1024
        _act_fwd_kernel[(triton.cdiv(numel, block),)](z, out, numel, ACT=act, BLOCK=block)
    return out.to(z.dtype)


def _act_backward(g2, z, act):
    dz = new_empty(z.shape, store_dtype(z.dtype), z.device)
    numel = z.numel()
    if numel > 0:
        block = 4096 if interpreter_shortcuts() else 1024
        _act_bwd_kernel[(triton.cdiv(numel, block),)](g2, z, dz, numel, ACT=act, BLOCK=block)
    return dz.to(z.dtype)


def _weight_grads(dz, x2, weight, bias, ctx, iw, ib):
    """dX, dW, db of ``x2 @ weight.T + bias`` given the gradient ``dz`` of that product."""
    dx = dz @ weight if ctx.needs_input_grad[0] else None
    dw = (dz.t() @ x2).to(weight.dtype) if ctx.needs_input_grad[iw] else None
    db = dz.sum(0, dtype=torch.float32).to(bias.dtype) if bias is not None and ctx.needs_input_grad[ib] else None
    return dx, dw, db


class _LinearActFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, act, grad_mode):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        # needs_input_grad stays set under no_grad; the caller's grad mode says if backward can come.
        store_z = grad_mode and act != 0 and any(ctx.needs_input_grad[:3])
        out, z = _gemm(x2, weight, bias, act, store_z=store_z)
        ctx.act = act
        ctx.save_for_backward(x2, weight, bias, z)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, weight, bias, z = ctx.saved_tensors
        g2 = g.reshape(-1, weight.shape[0]).contiguous()
        dz = g2 if ctx.act == 0 else _act_backward(g2, z, ctx.act)
        dx, dw, db = _weight_grads(dz, x2, weight, bias, ctx, 1, 2)
        if dx is not None:
            dx = dx.view(*g.shape[:-1], x2.shape[1])
        return dx, dw, db, None, None


def _sum_to(t, shape):
    """Reduce a broadcast gradient back to ``shape``."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


class _LinearResidualFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, scale, grad_mode):
        k = x.shape[-1]
        n = weight.shape[0]
        out_shape = (*x.shape[:-1], n)
        x2 = x.reshape(-1, k)
        r2 = residual.expand(out_shape).reshape(-1, n)
        y_dtype = x.dtype if scale is None else torch.promote_types(x.dtype, scale.dtype)
        out_dtype = torch.promote_types(y_dtype, residual.dtype)
        store_z = grad_mode and scale is not None and ctx.needs_input_grad[4]
        out, y = _gemm(x2, weight, bias, 0, residual2=r2, scale=scale, out_dtype=out_dtype,
                       store_z=store_z)
        ctx.save_for_backward(x2, weight, bias, scale, y)
        ctx.residual_shape = residual.shape
        ctx.residual_dtype = residual.dtype
        return out.view(out_shape)

    @staticmethod
    def backward(ctx, g):
        x2, weight, bias, scale, y = ctx.saved_tensors
        n = weight.shape[0]
        g2 = g.reshape(-1, n)
        dres = None
        if ctx.needs_input_grad[3]:
            dres = _sum_to(g, ctx.residual_shape).to(ctx.residual_dtype)
        dscale = None
        if scale is not None and ctx.needs_input_grad[4]:
            dscale = (g2.float() * y.float()).sum(0).to(scale.dtype)
        dz = g2 if scale is None else g2 * scale
        dz = dz.to(x2.dtype)
        dx, dw, db = _weight_grads(dz, x2, weight, bias, ctx, 1, 2)
        if dx is not None:
            dx = dx.view(*g.shape[:-1], x2.shape[1])
        return dx, dw, db, dres, dscale, None


def _check(x, weight, bias):
    check_tensors(x, weight, bias)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x (..., {x.shape[-1]}) does not match weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"linear: x is {x.dtype} but weight is {weight.dtype} (F.linear refuses this too)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_act(x, weight, bias, activation: str):
    """act(x @ weight.T + bias) with x (..., K), weight (N, K); act in gelu|gelu_tanh|quick_gelu|none."""
    act = activation_code(activation)
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check(x, weight, bias)
    return _LinearActFn.apply(x, weight, None if bias is None else bias.contiguous(),
                              act, torch.is_grad_enabled())


def linear_residual_not_supported(x, weight, bias, residual, scale=None) -> list[str]:
    """Why ``linear_residual`` cannot take these inputs (empty: it can). The op layer runs the
    reference for them: rare broadcasts it handles exactly."""
    n = weight.shape[0]
    out_shape = (*x.shape[:-1], n)
    reasons = []
    if scale is not None and tuple(scale.shape) != (n,):
        reasons.append(f"scale of shape {tuple(scale.shape)}: the epilogue reads a LayerScale vector ({n},)")
    if torch.broadcast_shapes(residual.shape, out_shape) != out_shape:
        reasons.append(f"residual {tuple(residual.shape)} widens the output {out_shape}")
    return reasons


def linear_residual(x, weight, bias, residual, scale=None):
    """residual + scale * (x @ weight.T + bias); ``scale`` is a LayerScale vector (N,) or None.
    The residual may broadcast over rows (not widen the output): see linear_residual_not_supported."""
    reasons = linear_residual_not_supported(x, weight, bias, residual, scale)
    if reasons:
        raise ValueError("linear_residual kernel: " + "; ".join(reasons))
    # Under autocast only the GEMM operands are cast (as F.linear's are); the residual keeps its
    # dtype and the output follows type promotion, as in the reference.
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check(x, weight, bias)
    check_tensors(residual, scale)
    return _LinearResidualFn.apply(x, weight, None if bias is None else bias.contiguous(),
                                   residual, None if scale is None else scale.contiguous(),
                                   torch.is_grad_enabled())
