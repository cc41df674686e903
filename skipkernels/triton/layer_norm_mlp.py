"""The whole MLP sub-block as one autograd op: ``x + scale ⊙ fc2(act(fc1(layer_norm(x))))``.

Forward is two kernels: LN fused into fc1's prologue with bias + activation in its epilogue
(``layer_norm_linear``), then fc2 with bias, LayerScale and the residual add in its epilogue
(``linear_residual``'s kernel). What it changes is what backward keeps: only x (the residual
stream, which the next op keeps anyway), two fp32 row statistics and fc1's pre-activation z.
The activation output act(z), the largest tensor of a block (4·D per token, as big as z), is
freed after the forward and recomputed from z by one elementwise kernel when backward needs it
for fc2's weight gradient; the LN output is recomputed as in ``layer_norm_linear``. Per training
block that is 4·B·L·D fewer saved values (13 → 9 B·L·D units with the fused LN, vs 15 for the
reference ops), for one extra elementwise pass over z in backward.
"""
from __future__ import annotations

import torch

from skipkernels.triton import activation_code, autocast_inputs, check_tensors
from skipkernels.triton import layer_norm_linear as tlnl
from skipkernels.triton import linear as tlin


class _LayerNormMlpFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, w1, b1, act, w2, b2, scale, grad_mode):
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        needs = ctx.needs_input_grad
        wants_grad = grad_mode and any(needs[i] for i in (0, 1, 2, 4, 5, 7, 8, 9))
        h, z, mean, rstd = tlnl._fused(x2, ln_weight, ln_bias, eps, w1, b1, act,
                                       store_z=wants_grad and act != 0, store_stats=wants_grad)
        y_dtype = h.dtype if scale is None else torch.promote_types(h.dtype, scale.dtype)
        out_dtype = torch.promote_types(y_dtype, x.dtype)
        store_y = wants_grad and scale is not None and needs[9]
        out, y = tlin._gemm(h, w2, b2, 0, residual2=x2, scale=scale, out_dtype=out_dtype, store_z=store_y)
        ctx.act, ctx.eps = act, eps
        if wants_grad:
            # Without an activation z is h itself; with one, h is recomputed from z in backward.
            ctx.save_for_backward(x2, ln_weight, ln_bias, w1, b1, w2, b2, scale, h if act == 0 else z,
                                  mean, rstd, y)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        x2, ln_weight, ln_bias, w1, b1, w2, b2, scale, z, mean, rstd, y = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, w2.shape[0])
        dscale = None
        if scale is not None and needs[9]:
            dscale = (g2.float() * y.float()).sum(0).to(scale.dtype)
        dy = (g2 if scale is None else g2 * scale).to(w2.dtype)
        dw2 = db2 = None
        if needs[7]:
            h = z if ctx.act == 0 else tlin._act_forward(z, ctx.act)
            dw2 = (dy.t() @ h).to(w2.dtype)
        if b2 is not None and needs[8]:
            db2 = dy.sum(0, dtype=torch.float32).to(b2.dtype)
        dx = dlnw = dlnb = dw1 = db1 = None
        if any(needs[i] for i in (0, 1, 2, 4, 5)):
            dh = (dy @ w2).contiguous()
            dz = dh if ctx.act == 0 else tlin._act_backward(dh, z, ctx.act)
            dx, dlnw, dlnb, dw1, db1 = tlnl.backward_from_preactivation(
                dz, x2, ln_weight, ln_bias, ctx.eps, w1, b1, mean, rstd,
                (needs[0], needs[1], needs[2], needs[4], needs[5]))
        if needs[0]:
            # The residual: x reaches the output unchanged, so its gradient passes straight through.
            dres = g2.to(x2.dtype)
            dx = dres if dx is None else dx + dres
            dx = dx.view(g.shape)
        return dx, dlnw, dlnb, None, dw1, db1, None, dw2, db2, dscale, None


def layer_norm_mlp(x, ln_weight, ln_bias, eps: float, w1, b1, activation: str, w2, b2, scale=None):
    """``x + scale * (act(layer_norm(x) @ w1.T + b1) @ w2.T + b2)``; ``scale`` a LayerScale (D,)."""
    act = activation_code(activation)
    # Under autocast only the GEMM operands are cast; the LN and the residual keep x's dtype.
    w1, b1, w2, b2 = autocast_inputs(w1, b1, w2, b2)
    check_tensors(x, ln_weight, ln_bias, w1, b1, w2, b2, scale)
    d = x.shape[-1]
    hidden = w1.shape[0] if w1.dim() == 2 else -1
    if w1.dim() != 2 or w1.shape[1] != d or w2.dim() != 2 or w2.shape != (d, hidden):
        raise ValueError(f"layer_norm_mlp: x (..., {d}) does not match fc1 {tuple(w1.shape)} / fc2 {tuple(w2.shape)}")
    for name, p, n in (("ln_weight", ln_weight, d), ("ln_bias", ln_bias, d), ("b1", b1, hidden),
                       ("b2", b2, d), ("scale", scale, d)):
        if p is not None and p.shape != (n,):
            raise ValueError(f"layer_norm_mlp: {name} must have shape ({n},), got {tuple(p.shape)}")
    if not torch.is_autocast_enabled(x.device.type):
        # Autocast gives every GEMM operand one dtype; without it F.linear refuses a mix.
        for name, t in (("fc1's weight", w1), ("fc1's bias", b1), ("fc2's weight", w2), ("fc2's bias", b2)):
            if t is not None and t.dtype != x.dtype:
                raise TypeError(f"layer_norm_mlp: x is {x.dtype} but {name} is {t.dtype} "
                                "(F.linear refuses this too)")
    contiguous = [None if t is None else t.contiguous() for t in (ln_weight, ln_bias, b1, b2, scale)]
    ln_weight, ln_bias, b1, b2, scale = contiguous
    return _LayerNormMlpFn.apply(x, ln_weight, ln_bias, float(eps), w1, b1, act,
                                 w2, b2, scale, torch.is_grad_enabled())
