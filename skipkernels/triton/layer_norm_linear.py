"""LayerNorm fused into the prologue of the following GEMM, in Triton.

``layer_norm_linear(x, ln_weight, ln_bias, eps, weight, bias, act)`` =
``act(layer_norm(x) @ weight.T + bias)``: the block's LN→QKV and LN→fc1(+GELU / QuickGELU).

Each program first takes the LayerNorm statistics of its BLOCK_M rows in one pass over K (chunk
means and squared deviations merged with Chan's update, as stable as a two-pass variance), then
runs the GEMM normalising every A tile as it is loaded. The normalised rows never go to memory:
per block that saves writing and re-reading B*L*D values twice (LN→QKV and LN→fc1) and one launch
each. The normalised tile is rounded to the GEMM's dtype before the dot, exactly where the
reference (``layer_norm`` then ``F.linear``) rounds its LN output; statistics and accumulation are
fp32. Under autocast the LN runs on ``x`` in its own dtype (fp32 for open_clip's residual stream,
as autocast runs ``layer_norm`` in fp32) and only the normalised tile is cast to the autocast
dtype, as ``F.linear`` would cast it.

Cost to watch on a GPU: every program of a row block takes the same statistics again (N/BLOCK_N
times, from L2), before its main loop where pipelining cannot hide it. If that loses to LayerNorm
+ cuBLAS at large M, the next step is to take the statistics once in the producer's epilogue
(per-tile mean / M2 partials of the residual add, merged in this prologue).

Backward keeps x, the per-row mean/rstd (fp32) and the pre-activation, not the normalised rows:
it recomputes them from those statistics with the LayerNorm kernel, takes dW, db, d(LN out) with torch matmuls and
finishes with the LayerNorm backward kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from skipkernels.triton import (activation_code, autocast_inputs, check_tensors, dot_precision,
                                interpreter_shortcuts, new_empty, store_dtype)
from skipkernels.triton import layer_norm as tln
from skipkernels.triton import linear as tlin



@triton.jit(do_not_specialize=["M"])  # M = rows changes with text length / batch: one variant
def _ln_linear_kernel(A, LnW, LnB, W, Bias, C, Z, Mean, Rstd, M, N, K, eps,
                      stride_am, stride_ak, stride_wn, stride_wk,
                      ACT: tl.constexpr, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr,
                      HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr, STORE_STATS: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tlin.grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    a_rows = A + rm[:, None].to(tl.int64) * stride_am

    # Pass 1: row statistics. Each K chunk's mean and sum of squared deviations are merged into
    # the running ones (Chan et al.), so no E[x²] − E[x]² cancellation on outlier channels.
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_rows + (k0 + rk)[None, :] * stride_ak, mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        count = tl.minimum(K - k0, BLOCK_K) * 1.0  # `* 1.0`: k0 is an int under the interpreter
        chunk_mean = tl.sum(a, axis=1) / count
        dev = tl.where(kmask[None, :], a - chunk_mean[:, None], 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=1)
        seen = k0 * 1.0
        total = seen + count
        shift = chunk_mean - mean
        mean += shift * (count / total)
        m2 += chunk_m2 + shift * shift * (seen * count / total)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    if STORE_STATS:
        if pid_n == 0:
            tl.store(Mean + rm, mean, mask=mmask)
            tl.store(Rstd + rm, rstd, mask=mmask)

    # Pass 2: the GEMM, normalising each A tile on load.
    w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + rk
        kmask = cols < K
        a = tl.load(a_rows + cols[None, :] * stride_ak, mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        a = (a - mean[:, None]) * rstd[:, None]
        if HAS_LN_W:
            a *= tl.load(LnW + cols, mask=kmask, other=0.0).to(tl.float32)[None, :]
        if HAS_LN_B:
            a += tl.load(LnB + cols, mask=kmask, other=0.0).to(tl.float32)[None, :]
        # Round where the reference stores its LN output (a no-op for fp32 weights).
        a = a.to(W.dtype.element_ty)
        w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K * stride_wk

    mask = mmask[:, None] & nmask[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    acc = tlin.bias_act_epilogue(acc, Bias, Z, rn, nmask, offs, mask, ACT, HAS_BIAS, STORE_Z)
    tl.store(C + offs, acc.to(C.dtype.element_ty), mask=mask)


def _fused(x2, ln_weight, ln_bias, eps, weight, bias, act, store_z, store_stats):
    """One launch. Returns (out, z, mean, rstd); z/mean/rstd only when asked for."""
    m, k = x2.shape
    n = weight.shape[0]
    dev = x2.device
    out = new_empty((m, n), store_dtype(weight.dtype), dev)
    z = new_empty((m, n), store_dtype(weight.dtype), dev) if store_z else None
    mean = new_empty((m,), torch.float32, dev) if store_stats else None
    rstd = new_empty((m,), torch.float32, dev) if store_stats else None
    if m > 0 and n > 0:
        args = (x2, ln_weight, ln_bias, weight, bias, out, z, mean, rstd, m, n, k, eps,
                x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1))
        meta = dict(ACT=act, HAS_LN_W=ln_weight is not None, HAS_LN_B=ln_bias is not None,
                    HAS_BIAS=bias is not None, STORE_Z=store_z, STORE_STATS=store_stats,
                    UPCAST=interpreter_shortcuts() or weight.dtype == torch.float32,
                    PRECISION=dot_precision(weight.dtype))
        tlin.launch_gemm(_ln_linear_kernel, "layer_norm_linear", m, n, k, args, meta, weight.dtype, x2.dtype)
    out = out.to(weight.dtype)
    if z is not None:
        z = z.to(weight.dtype)
    return out, z, mean, rstd


class _LayerNormLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, weight, bias, act, grad_mode):
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        # needs_input_grad stays set under no_grad; the caller's grad mode says if backward can come.
        wants_grad = grad_mode and any(ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5))
        out, z, mean, rstd = _fused(x2, ln_weight, ln_bias, eps, weight, bias, act,
                                    store_z=wants_grad and act != 0, store_stats=wants_grad)
        ctx.act, ctx.eps = act, eps
        if wants_grad:
            ctx.save_for_backward(x2, ln_weight, ln_bias, weight, bias, z, mean, rstd)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, ln_weight, ln_bias, weight, bias, z, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, weight.shape[0]).contiguous()
        dz = g2 if ctx.act == 0 else tlin._act_backward(g2, z, ctx.act)
        dx, dlnw, dlnb, dw, db = backward_from_preactivation(
            dz, x2, ln_weight, ln_bias, ctx.eps, weight, bias, mean, rstd,
            (needs[0], needs[1], needs[2], needs[4], needs[5]))
        if dx is not None:
            dx = dx.view(*g.shape[:-1], x2.shape[1])
        return dx, dlnw, dlnb, None, dw, db, None, None


def backward_from_preactivation(dz, x2, ln_weight, ln_bias, eps, weight, bias, mean, rstd, needs):
    """Gradients of ``layer_norm(x2) @ weight.T + bias`` given ``dz``, the gradient of that
    product: (dx2, d ln_weight, d ln_bias, dW, db), each None unless ``needs`` asks for it (in
    that order). ``mean`` / ``rstd`` are the forward's row statistics."""
    need_x, need_lnw, need_lnb, need_w, need_b = needs
    x2 = x2.contiguous()  # the LayerNorm kernels index rows densely; the GEMM took strides
    dz = dz.to(weight.dtype)
    dw = db = None
    if need_w:
        # The normalised rows in the GEMM's dtype from the forward's own statistics: the rows the
        # forward fed to the dot (up to the compiler's choice of fused multiply-adds).
        h = tln.normalize_with_stats(x2, ln_weight, ln_bias, mean, rstd, weight.dtype)
        dw = (dz.t() @ h).to(weight.dtype)
    if bias is not None and need_b:
        db = dz.sum(0, dtype=torch.float32).to(bias.dtype)
    dx = dlnw = dlnb = None
    need_lnw = ln_weight is not None and need_lnw
    need_lnb = ln_bias is not None and need_lnb
    if need_x or need_lnw or need_lnb:
        dh = dz @ weight
        dx, dlnw, dlnb = tln._bwd(dh.to(x2.dtype).contiguous(), x2, ln_weight, mean, rstd,
                                  need_lnw, need_lnb)
        dx = dx if need_x else None
        dlnw = None if dlnw is None else dlnw.to(ln_weight.dtype)
        dlnb = None if dlnb is None else dlnb.to(ln_bias.dtype)
    return dx, dlnw, dlnb, dw, db


def layer_norm_linear(x, ln_weight, ln_bias, eps: float, weight, bias, activation: str = "none"):
    """act(layer_norm(x) @ weight.T + bias), x (..., K), weight (N, K); one kernel forward."""
    act = activation_code(activation)
    # Under autocast only the GEMM's operands are cast (F.linear's); the LN stays in x's dtype.
    weight, bias = autocast_inputs(weight, bias)
    check_tensors(x, ln_weight, ln_bias, weight, bias)
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"layer_norm_linear: x (..., {k}) does not match weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"layer_norm_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, p in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if p is not None and p.shape != (k,):
            raise ValueError(f"layer_norm_linear: {name} must have shape ({k},), got {tuple(p.shape)}")
    autocasting = torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocasting:
        raise TypeError(f"layer_norm_linear: x is {x.dtype} but weight is {weight.dtype} "
                        "(F.linear refuses this too)")
    return _LayerNormLinearFn.apply(
        x, None if ln_weight is None else ln_weight.contiguous(),
        None if ln_bias is None else ln_bias.contiguous(), float(eps),
        weight, None if bias is None else bias.contiguous(), act,
        torch.is_grad_enabled())
