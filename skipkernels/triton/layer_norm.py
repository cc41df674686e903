"""LayerNorm (forward and backward) in Triton.

Semantics match ``skipkernels.ops.layer_norm``: statistics in fp32, result in the input dtype.

Forward: one pass over each row tile reads x, writes y, and keeps only the per-row mean and rstd
(fp32) for backward. Backward recomputes x̂ from x, mean and rstd, writes dx and per-program
partial sums of dw/db, which torch reduces over a few hundred rows at most.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from skipkernels.triton import check_tensors, interpreter_shortcuts, interpreting, new_empty, store_dtype



@triton.jit
def _ln_fwd_kernel(X, Y, W, B, Mean, Rstd, M, N, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   GIVEN_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # GIVEN_STATS: normalise with the Mean / Rstd passed in (a backward recomputing a forward's
    # normalised rows exactly) instead of taking and storing them.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if GIVEN_STATS:
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xc = tl.where(mask, x - mean[:, None], 0.0)
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if not GIVEN_STATS:
        tl.store(Mean + rows, mean, mask=rmask)
        tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DY, S, W, Mean, Rstd, DX, DWp, DBp, M, N, rows_per_prog,
                   HAS_W: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            db_acc += tl.sum(dy, axis=0)
    if NEED_DW:
        tl.store(DWp + pid * N + cols, dw_acc, mask=cmask)
    if NEED_DB:
        tl.store(DBp + pid * N + cols, db_acc, mask=cmask)


def _config(n: int):
    block_n = triton.next_power_of_2(n)
    if interpreter_shortcuts():
        # The interpreter pays per operation, not per element: use big tiles.
        return max(1, min(64, 16384 // block_n)), block_n, 4
    # A few rows per program keep small widths (512-1024) from leaving warps idle.
    block_m = max(1, min(16, 2048 // block_n))
    num_warps = 4 if block_n * block_m <= 2048 else 8
    return block_m, block_n, num_warps


def _fwd(x2, weight, bias, eps, out_dtype, stats=None):
    """One launch: returns (y, mean, rstd). With ``stats=(mean, rstd)`` the rows are
    normalised with those (a backward reproducing a forward's rows) and they are returned as is."""
    m, n = x2.shape
    dev = x2.device
    sd = store_dtype(out_dtype)
    y = new_empty((m, n), sd, dev)
    if stats is None:
        mean, rstd = new_empty((m,), torch.float32, dev), new_empty((m,), torch.float32, dev)
    else:
        mean, rstd = stats
    if m > 0:
        block_m, block_n, num_warps = _config(n)
        _ln_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, y, weight, bias, mean, rstd, m, n, eps, HAS_W=weight is not None, HAS_B=bias is not None,
            GIVEN_STATS=stats is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    if sd != out_dtype:
        y = y.to(out_dtype)
    return y, mean, rstd


def normalize_with_stats(x2, weight, bias, mean, rstd, out_dtype):
    """``(x2 - mean) * rstd * weight + bias`` rounded once to ``out_dtype``: the normalised rows
    of a forward that saved its (fp32) row statistics, without taking them again."""
    return _fwd(x2, weight, bias, 0.0, out_dtype, stats=(mean, rstd))[0]


def _bwd(dy2, s2, weight, mean, rstd, need_dw, need_db):
    m, n = s2.shape
    dev = s2.device
    sd = store_dtype(s2.dtype)
    dx = new_empty((m, n), sd, dev)
    block_m, block_n, num_warps = _config(n)
    tiles = triton.cdiv(m, block_m)
    # Enough programs to fill the GPU; each writes one fp32 row of dw/db partials.
    target = 4 if interpreting() else 4 * torch.cuda.get_device_properties(dev).multi_processor_count
    programs = max(1, min(tiles, target))
    rows_per_prog = triton.cdiv(tiles, programs) * block_m
    programs = triton.cdiv(m, rows_per_prog) if m > 0 else 0
    dwp = torch.empty((programs, n), dtype=torch.float32, device=dev) if need_dw else None
    dbp = torch.empty((programs, n), dtype=torch.float32, device=dev) if need_db else None
    if programs > 0:
        _ln_bwd_kernel[(programs,)](
            dy2, s2, weight, mean, rstd, dx, dwp, dbp, m, n, rows_per_prog, HAS_W=weight is not None, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    if sd != s2.dtype:
        dx = dx.to(s2.dtype)
    dw = dwp.sum(0) if need_dw else None
    db = dbp.sum(0) if need_db else None
    return dx, dw, db


def _rows(t, n):
    return t.reshape(-1, n).contiguous()


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = x.shape[-1]
        x2 = _rows(x, n)
        y, mean, rstd = _fwd(x2, weight, bias, eps, x.dtype)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        n = x2.shape[-1]
        need_dw = weight is not None and ctx.needs_input_grad[1]
        need_db = ctx.has_bias and ctx.needs_input_grad[2]
        dx, dw, db = _bwd(_rows(dy, n), x2, weight, mean, rstd, need_dw, need_db)
        return (dx.view(dy.shape) if ctx.needs_input_grad[0] else None,
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(ctx.bias_dtype), None)


def _check(x, weight, bias):
    check_tensors(x, weight, bias)
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != n):
            raise ValueError(f"layer_norm {name} must have shape ({n},), got {tuple(p.shape)}")


def _params(weight, bias):
    return (None if weight is None else weight.contiguous(),
            None if bias is None else bias.contiguous())


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last dim; fp32 statistics, result in ``x.dtype``."""
    _check(x, weight, bias)
    weight, bias = _params(weight, bias)
    return _LayerNormFn.apply(x, weight, bias, float(eps))
