"""Fused VL-PET gated update ``out = x + s * g ⊙ (h + delta_h)`` in Triton, forward and backward.

Semantics match ``skipkernels.ops.pet_gate.gated_update_reference`` except that the kernel
computes in fp32 and rounds once on store (the reference rounds after every op in low precision).

Layout: ``x``, ``h``, ``delta_h`` share one shape, (B, L, D) or (M, D), and are made contiguous;
``g`` is any tensor that broadcasts to it with at most 3 dims. ``g`` is read through its expanded
strides (0 along broadcast dims), so every gate granularity uses the same kernel without
materialising the broadcast.

Backward, one pass over (row group, column chunk) tiles:
- ``dh = d(delta_h) = s * g * dout`` (one tensor returned for both), ``dx = dout``;
- ``dg = s * dout * (h + delta_h)`` reduced to g's shape: written elementwise when g is full,
  as per-(row, column chunk) partial sums when g is constant along D ((B, L, 1), (B, 1, 1)), as
  per-(row group, column) partial sums when g is constant along rows ((D,)); torch adds the few
  partials (fp32) and ``sum_to_size`` folds the remaining broadcast dims;
- ``ds = Σ dout * g * (h + delta_h)`` as one fp32 partial per program, when ``s`` is a tensor
  that needs a gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from skipkernels.triton import check_tensors, new_empty, store_dtype

_G_FULL, _G_ROW, _G_COL = 0, 1, 2
# A per-channel gate's gradient is summed in row groups: at most this many (group, D) partials.
_MAX_ROW_GROUPS = 128


@triton.jit
def _gate_fwd_kernel(X, H, DH, G, S, OUT, M, D, L, sgb, sgl, sgd, s_val,
                     HAS_X: tl.constexpr, HAS_DH: tl.constexpr, S_IS_TENSOR: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < M
    mask = rmask[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    goffs = ((rows // L) * sgb + (rows % L) * sgl)[:, None] + cols[None, :].to(tl.int64) * sgd
    u = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DH:
        u += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + goffs, mask=mask, other=0.0).to(tl.float32)
    if S_IS_TENSOR:
        s = tl.load(S).to(tl.float32)
    else:
        s = s_val
    y = (g * s) * u
    if HAS_X:
        y += tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(DOUT, H, DH, G, S, DU, DG, DS, M, D, L, sgb, sgl, sgd, s_val, rows_per_prog,
                     n_col_chunks,
                     HAS_DH: tl.constexpr, S_IS_TENSOR: tl.constexpr, NEED_DU: tl.constexpr,
                     NEED_DG: tl.constexpr, G_MODE: tl.constexpr, NEED_DS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    if S_IS_TENSOR:
        s = tl.load(S).to(tl.float32)
    else:
        s = s_val
    col_acc = tl.zeros((BLOCK_D,), tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), tl.float32)
    row0 = pid_m * rows_per_prog
    for r in range(0, rows_per_prog, BLOCK_M):
        rows = (row0 + r + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        goffs = ((rows // L) * sgb + (rows % L) * sgl)[:, None] + cols[None, :].to(tl.int64) * sgd
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + goffs, mask=mask, other=0.0).to(tl.float32)
        if NEED_DU:
            tl.store(DU + offs, ((g * s) * dout).to(DU.dtype.element_ty), mask=mask)
        if NEED_DG or NEED_DS:
            u = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_DH:
                u += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            du_g = dout * u
            if NEED_DG:
                t = du_g * s
                if G_MODE == 0:
                    tl.store(DG + offs, t.to(DG.dtype.element_ty), mask=mask)
                elif G_MODE == 1:
                    tl.store(DG + rows * n_col_chunks + pid_d, tl.sum(t, axis=1), mask=rmask)
                else:
                    col_acc += tl.sum(t, axis=0)
            if NEED_DS:
                ds_acc += tl.sum(du_g * g, axis=1)
    if NEED_DG and G_MODE == 2:
        tl.store(DG + pid_m.to(tl.int64) * D + cols, col_acc, mask=cmask)
    if NEED_DS:
        tl.store(DS + pid_m * n_col_chunks + pid_d, tl.sum(ds_acc, axis=0))


def _blocks(m: int, d: int):
    block_d = min(triton.next_power_of_2(d), 256)
    block_m = min(triton.next_power_of_2(m), max(1, 4096 // block_d))
    return block_m, block_d


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def _gate_strides(g: torch.Tensor, shape3) -> tuple[int, int, int]:
    if g.dim() > 3:
        raise ValueError(f"gate of shape {tuple(g.shape)} has more than 3 dims")
    return tuple(g.expand(shape3).stride())


def _g_mode(strides) -> int:
    sgb, sgl, sgd = strides
    if sgd == 0:
        return _G_ROW
    if sgb == 0 and sgl == 0:
        return _G_COL
    return _G_FULL


def _scale(s):
    """(tensor or None, float value) for the kernel's S / s_val arguments."""
    if isinstance(s, torch.Tensor):
        if s.numel() != 1:
            raise ValueError(f"scale must be a float or a one-element tensor, got shape {tuple(s.shape)}")
        return s.reshape(1).to(torch.float32), 0.0
    return None, float(s)


class _GatedUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, delta_h, g, s):
        check_tensors(x, h, delta_h, g)
        if h.dim() not in (2, 3):
            raise ValueError(f"h must be (B, L, D) or (M, D), got shape {tuple(h.shape)}")
        for name, t in (("x", x), ("delta_h", delta_h)):
            if t is not None and t.shape != h.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, h has {tuple(h.shape)}")
        h = h.contiguous()
        x = None if x is None else x.contiguous()
        delta_h = None if delta_h is None else delta_h.contiguous()
        shape3 = _as_rows(h).shape
        batch, length, width = shape3
        strides = _gate_strides(g, shape3)
        s_tensor, s_val = _scale(s)
        out_dtype = h.dtype
        for t in (x, delta_h, g):
            if t is not None:
                out_dtype = torch.promote_types(out_dtype, t.dtype)
        rows = batch * length
        out = new_empty(h.shape, store_dtype(out_dtype), h.device)
        block_m, block_d = _blocks(rows, width)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(width, block_d))
        _gate_fwd_kernel[grid](x if x is not None else h, h, delta_h if delta_h is not None else h, g,
                               s_tensor if s_tensor is not None else g, out, rows, width, length,
                               *strides, s_val, HAS_X=x is not None, HAS_DH=delta_h is not None,
                               S_IS_TENSOR=s_tensor is not None, BLOCK_M=block_m, BLOCK_D=block_d)
        ctx.save_for_backward(h, delta_h, g, s_tensor)
        s_is_tensor = isinstance(s, torch.Tensor)
        ctx.meta = (shape3, strides, s_val, None if x is None else x.dtype, s_is_tensor,
                    s.shape if s_is_tensor else None, s.dtype if s_is_tensor else None)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        h, delta_h, g, s_tensor = ctx.saved_tensors
        shape3, strides, s_val, x_dtype, s_is_tensor, s_shape, s_dtype = ctx.meta
        need_x, need_h, need_dh, need_g, need_s = ctx.needs_input_grad
        need_s = need_s and s_is_tensor
        dout = dout.contiguous()
        batch, length, width = shape3
        rows = batch * length
        device = dout.device
        need_du = need_h or need_dh
        mode = _g_mode(strides)
        block_m, block_d = _blocks(rows, width)
        n_col = triton.cdiv(width, block_d)
        rows_per_prog = block_m
        if mode == _G_COL:
            # Fewer row groups means fewer (group, D) partials for torch to add up.
            rows_per_prog = block_m * triton.cdiv(triton.cdiv(rows, block_m), _MAX_ROW_GROUPS)
        n_row = triton.cdiv(rows, rows_per_prog)

        du = new_empty(h.shape, store_dtype(h.dtype), device) if need_du else None
        dg_buf = None
        if need_g:
            if mode == _G_FULL:
                full_dtype = store_dtype(g.dtype) if tuple(g.shape) == tuple(h.shape) else torch.float32
                dg_buf = new_empty(h.shape, full_dtype, device)
            elif mode == _G_ROW:
                dg_buf = new_empty((rows, n_col), torch.float32, device)
            else:
                dg_buf = new_empty((n_row, width), torch.float32, device)
        ds_buf = new_empty((n_row, n_col), torch.float32, device) if need_s else None
        if need_du or need_g or need_s:
            dummy = dout
            _gate_bwd_kernel[(n_row, n_col)](
                dout, h, delta_h if delta_h is not None else dummy, g,
                s_tensor if s_tensor is not None else dummy,
                du if du is not None else dummy, dg_buf if dg_buf is not None else dummy,
                ds_buf if ds_buf is not None else dummy,
                rows, width, length, *strides, s_val, rows_per_prog, n_col,
                HAS_DH=delta_h is not None, S_IS_TENSOR=s_tensor is not None, NEED_DU=need_du,
                NEED_DG=need_g, G_MODE=mode, NEED_DS=need_s, BLOCK_M=block_m, BLOCK_D=block_d)

        dx = dout.to(x_dtype) if need_x else None
        dh = du.to(h.dtype) if need_h else None
        ddh = du.to(delta_h.dtype) if need_dh else None
        dg = None
        if need_g:
            if mode == _G_FULL:
                dg = dg_buf.reshape(shape3)
            elif mode == _G_ROW:
                dg = dg_buf.sum(1).reshape(batch, length, 1)
            else:
                dg = dg_buf.sum(0).reshape(1, 1, width)
            dg = dg.sum_to_size(g.shape) if g.dim() == 3 else _sum_to_lower_dim(dg, g.shape)
            dg = dg.to(g.dtype)
        ds = ds_buf.sum().reshape(s_shape).to(s_dtype) if need_s else None
        return dx, dh, ddh, dg, ds


def _sum_to_lower_dim(t3: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a (B, L, D)-shaped gradient to a gate of fewer dims (broadcast from the left)."""
    lead = 3 - len(shape)
    t = t3.sum(dim=tuple(range(lead))) if lead else t3
    return t.sum_to_size(shape)


def gated_update(x, h, delta_h, g, s=1.0):
    """Fused ``x + s * g * (h + delta_h)``; ``x`` and ``delta_h`` may be None."""
    return _GatedUpdate.apply(x, h, delta_h, g, s)
