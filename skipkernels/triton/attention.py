"""Flash-attention forward (online softmax) in Triton.

``attention(q, k, v, causal, attn_mask, key_limit)`` on (B, H, L, Dh) tensors, same semantics as
``skipkernels.ops.attention.attention_reference`` (scaled_dot_product_attention with scale
1/sqrt(Dh)):

- ``causal``: query i sees keys 0..i (needs Lq == Lk, as the reference);
- ``attn_mask``: an additive float mask or a bool mask (True = attend) broadcastable to
  (B, H, Lq, Lk), read through stride-0 broadcasting (never materialised); a float mask is first
  cast to q's dtype, as the reference does;
- ``key_limit`` (B,): keys >= key_limit[b] are masked. Key blocks past the limit (and past the
  diagonal under ``causal``) are skipped, so truncated prompts cost only their real length.

A query row whose keys are all masked gets zeros, as PyTorch's SDPA returns.

Scores, softmax statistics and the output accumulator are fp32. The output is allocated in
(B, Lq, H, Dh) memory order and returned as a (B, H, Lq, Dh) view, so the block's following
``transpose(1, 2).reshape(B, L, D)`` is free.

Backward is FlashAttention-2's, in two Triton kernels: one program per query tile accumulates dQ
over its key tiles, one program per key tile then accumulates dK and dV over the query tiles that
see it, both recomputing P from the saved per-row log-sum-exp (fp32, B*H*Lq floats) instead of
storing the Lq x Lk probabilities. The dQ kernel first computes ``delta = rowsum(P * dP)`` (not
FlashAttention's ``rowsum(dO * O)``: see the kernel) and stores it for the dK/dV kernel. No atomics,
so gradients are deterministic. Key tiles past ``key_limit`` / the causal diagonal are skipped in
both, and a fully masked row has log-sum-exp +inf, so its P (and gradient) is exactly 0.

A float mask that itself requires grad is rare (open_clip's masks are constants); for it backward
recomputes the reference (``F.scaled_dot_product_attention``) under autograd and differentiates
that, which also yields the mask's gradient.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from skipkernels.triton import (autocast_inputs, check_tensors, dot_precision, interpreter_shortcuts, new_empty,
                                store_dtype)


_NO_MASK, _FLOAT_MASK, _BOOL_MASK = 0, 1, 2


@triton.jit
def _masked_scores(s, qi, ki, valid, Mask, mask_off, smm, smn,
                   CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores with the mask applied, -inf where a key is not visible: the one masking rule of the
    forward and both backward kernels. ``qi``/``ki`` are the query/key indices broadcast to the
    tile's orientation (the dK/dV kernel works on transposed tiles)."""
    if CAUSAL:
        valid = valid & (ki <= qi)
    if MASK_KIND == 1:
        s += tl.load(Mask + mask_off + qi * smm + ki * smn, mask=valid, other=0.0).to(tl.float32)
    if MASK_KIND == 2:
        keep = tl.load(Mask + mask_off + qi * smm + ki * smn, mask=valid, other=0)
        valid = valid & (keep != 0)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _masked_probs(s, lse, qi, ki, valid, Mask, mask_off, smm, smn,
                  CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """P = exp(s + mask - lse) from the forward's log-sum-exp; 0 where not visible (also for a
    fully masked row, whose lse is +inf)."""
    return tl.exp(_masked_scores(s, qi, ki, valid, Mask, mask_off, smm, smn, CAUSAL, MASK_KIND) - lse)


@triton.jit
def _keys_tile(base, cols, offs_d, sn, sd, dmask, nmask, UPCAST: tl.constexpr):
    """A K or V tile as (Dh x keys): the orientation both backward kernels read."""
    t = tl.load(base + cols[None, :] * sn + offs_d[:, None] * sd, mask=dmask[:, None] & nmask[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _probs_and_dprobs(q, g, k_t, v_t, lse, qi, ki, valid, Mask, mask_off, smm, smn, sm_scale,
                      CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, PRECISION: tl.constexpr):
    """P and dP = dO Vᵀ of one (queries x keys) tile. The dQ kernel's two passes and the dK/dV
    kernel all compute them here, from the same operands in the same orientation, so the delta
    summed from them cancels in every dS = P (dP - delta) (see the dQ kernel)."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * sm_scale
    p = _masked_probs(s, lse, qi, ki, valid, Mask, mask_off, smm, smn, CAUSAL, MASK_KIND)
    return p, tl.dot(g, v_t, input_precision=PRECISION)


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, Lse, Mask, KeyLimit, sm_scale,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sob, soh, som, sod, smb, smh, smm, smn,
                     H, Lq, Lk, D,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LIMIT: tl.constexpr,
                     STORE_LSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)  # batch x heads on axis 0: axis 1 is capped at 65535
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D

    q_ptrs = Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=mmask[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + h * skh
    v_base = V + b.to(tl.int64) * svb + h * svh
    mask_off = b.to(tl.int64) * smb + h * smh

    # Keys past `hi` are masked for every row of this tile: do not even visit them.
    hi = Lk
    if HAS_LIMIT:
        hi = tl.minimum(hi, tl.load(KeyLimit + b).to(tl.int32))
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < hi
        k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                    mask=dmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        # Natural-log domain with the fp32 scale SDPA uses: folding log2(e) into the scale (for
        # exp2) would shift every softmax's temperature by one shared rounding error, a bias
        # that adds up in reductions such as the head-scale gradient.
        s = _masked_scores(tl.dot(q, k, input_precision=PRECISION) * sm_scale, offs_m[:, None], cols[None, :],
                           mmask[:, None] & nmask[None, :], Mask, mask_off, smm, smn, CAUSAL, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with no visible key so far keep m = -inf; shift them by 0 so exp gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_shift)
        p = tl.exp(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        else:
            p = p.to(v.dtype)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = O + b.to(tl.int64) * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    if STORE_LSE:
        # +inf for a row with no visible key: backward's exp(s - lse) is then 0 for all of it.
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, lse, mask=mmask)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, Mask, KeyLimit, sm_scale,
                          sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                          sgb, sgh, sgm, sgd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                          smb, smh, smm, smn, H, Lq, Lk, D,
                          CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LIMIT: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One key tile per program, accumulating dV += Pᵀ dO and dK += dSᵀ Q over the query tiles.
    bh = tl.program_id(0)  # batch x heads on axis 0: axis 1 is capped at 65535
    pid_n = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nmask = offs_n < Lk
    hi = Lq
    if HAS_LIMIT:
        limit = tl.load(KeyLimit + b).to(tl.int32)
        nvisible = offs_n < limit
        hi = tl.where(pid_n * BLOCK_N < limit, Lq, 0)  # no query sees this tile: dK = dV = 0
    else:
        nvisible = nmask
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # query tiles above the diagonal see none of it

    kv_mask = nmask[:, None] & dmask[None, :]
    # This key tile's K and V, and below P and dP, exactly as the dQ kernel computes them.
    k_t = _keys_tile(K + b.to(tl.int64) * skb + h * skh, offs_n, offs_d, skn, skd, dmask, nmask, UPCAST)
    v_t = _keys_tile(V + b.to(tl.int64) * svb + h * svh, offs_n, offs_d, svn, svd, dmask, nmask, UPCAST)
    q_base = Q + b.to(tl.int64) * sqb + h * sqh
    g_base = DO + b.to(tl.int64) * sgb + h * sgh
    mask_off = b.to(tl.int64) * smb + h * smh
    row_base = bh.to(tl.int64) * Lq
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mmask = offs_m < Lq
        qd_mask = mmask[:, None] & dmask[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
        g = tl.load(g_base + offs_m[:, None] * sgm + offs_d[None, :] * sgd, mask=qd_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            g = g.to(tl.float32)
        lse = tl.load(Lse + row_base + offs_m, mask=mmask, other=0.0)
        delta = tl.load(Delta + row_base + offs_m, mask=mmask, other=0.0)
        p, dp = _probs_and_dprobs(q, g, k_t, v_t, lse[:, None], offs_m[:, None], offs_n[None, :],
                                  mmask[:, None] & nvisible[None, :], Mask, mask_off, smm, smn, sm_scale,
                                  CAUSAL, MASK_KIND, PRECISION)
        ds = p * (dp - delta[:, None])
        if not UPCAST:
            p = p.to(g.dtype)
            ds = ds.to(q.dtype)
        dv = tl.dot(tl.trans(p), g, dv, input_precision=PRECISION)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)

    tl.store(DK + b.to(tl.int64) * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, Mask, KeyLimit, sm_scale,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sgb, sgh, sgm, sgd, sdqb, sdqh, sdqm, sdqd,
                        smb, smh, smm, smn, H, Lq, Lk, D,
                        CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LIMIT: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)  # batch x heads on axis 0: axis 1 is capped at 65535
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < Lq
    dmask = offs_d < D
    qd_mask = mmask[:, None] & dmask[None, :]
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=qd_mask, other=0.0)
    g = tl.load(DO + b.to(tl.int64) * sgb + h * sgh + offs_m[:, None] * sgm + offs_d[None, :] * sgd,
                mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        g = g.to(tl.float32)
    row_base = bh.to(tl.int64) * Lq
    lse = tl.load(Lse + row_base + offs_m, mask=mmask, other=0.0)
    k_base = K + b.to(tl.int64) * skb + h * skh
    v_base = V + b.to(tl.int64) * svb + h * svh
    mask_off = b.to(tl.int64) * smb + h * smh

    hi = Lk  # the forward's bound: keys no row of this tile sees are not visited
    if HAS_LIMIT:
        hi = tl.minimum(hi, tl.load(KeyLimit + b).to(tl.int32))
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)

    # Pass 1: delta = rowsum(P * dP) / rowsum(P) from the very P and dP tiles pass 2 recomputes.
    # FlashAttention's rowsum(dO * O) is equal in exact arithmetic, but rounded independently of
    # dP, so where one key takes nearly all of a row's softmax, dS = P (dP - delta) is a cancellation
    # of two unrelated roundings (dQ's error several times PyTorch's). Dividing by rowsum(P) removes
    # the error P = exp(s - lse) shares across the row through lse's rounding, which grows with the
    # logits: dP - delta is then a difference of one weighted mean's own terms, as in autograd.
    delta = tl.zeros((BLOCK_M,), tl.float32)
    p_sum = tl.zeros((BLOCK_M,), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < hi
        k_t = _keys_tile(k_base, cols, offs_d, skn, skd, dmask, nmask, UPCAST)
        v_t = _keys_tile(v_base, cols, offs_d, svn, svd, dmask, nmask, UPCAST)
        p, dp = _probs_and_dprobs(q, g, k_t, v_t, lse[:, None], offs_m[:, None], cols[None, :],
                                  mmask[:, None] & nmask[None, :], Mask, mask_off, smm, smn, sm_scale,
                                  CAUSAL, MASK_KIND, PRECISION)
        delta += tl.sum(p * dp, axis=1)
        p_sum += tl.sum(p, axis=1)
    delta = delta / tl.where(p_sum == 0.0, 1.0, p_sum)  # a row that sees no key: P = 0, delta = 0
    tl.store(Delta + row_base + offs_m, delta, mask=mmask)  # for the dK/dV kernel, launched next

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        nmask = cols < hi
        k_t = _keys_tile(k_base, cols, offs_d, skn, skd, dmask, nmask, UPCAST)
        v_t = _keys_tile(v_base, cols, offs_d, svn, svd, dmask, nmask, UPCAST)
        p, dp = _probs_and_dprobs(q, g, k_t, v_t, lse[:, None], offs_m[:, None], cols[None, :],
                                  mmask[:, None] & nmask[None, :], Mask, mask_off, smm, smn, sm_scale,
                                  CAUSAL, MASK_KIND, PRECISION)
        ds = p * (dp - delta[:, None])
        if not UPCAST:
            ds = ds.to(k_t.dtype)
        dq = tl.dot(ds, tl.trans(k_t), dq, input_precision=PRECISION)

    tl.store(DQ + b.to(tl.int64) * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_mask)


def _blocks(lq, lk, d):
    block_d = max(16, triton.next_power_of_2(d))
    if interpreter_shortcuts():
        # Per-operation cost under the interpreter: whole (small) sequences per tile.
        return (min(128, max(16, triton.next_power_of_2(lq))),
                min(128, max(16, triton.next_power_of_2(lk))), block_d, 4, 1)
    # A pooled single query (pruned last block) needs only a 16-row tile.
    block_m = 16 if lq <= 16 else (64 if lq <= 256 or block_d > 64 else 128)
    block_n = 64 if block_d <= 64 else 32
    num_warps = 4 if block_m <= 64 else 8
    return block_m, block_n, block_d, num_warps, 2


def _bwd_blocks(lq, lk, d):
    """(dK/dV tile: BLOCK_M, BLOCK_N), (dQ tile: BLOCK_M, BLOCK_N), BLOCK_D, warps, stages."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpreter_shortcuts():
        m = min(128, max(16, triton.next_power_of_2(lq)))
        n = min(128, max(16, triton.next_power_of_2(lk)))
        return (m, n), (m, n), block_d, 4, 1
    if block_d > 128:
        return (16, 32), (32, 16), block_d, 4, 1
    # Short sequences (77, 197 tokens): small tiles keep B*H*tiles programs above the SM count.
    small_m = 16 if lq <= 16 else 32
    return (small_m, 64), (small_m if lq <= 16 else 64, 32), block_d, 4, 2 if block_d <= 64 else 1


def _token_major(shape, dtype, device):
    """(B, L, H, D) memory as a (B, H, L, D) view: the caller's transpose back to tokens is free."""
    batch, heads, length, d = shape
    return new_empty((batch, length, heads, d), store_dtype(dtype), device).permute(0, 2, 1, 3)


def _forward(q, k, v, causal, mask, mask_kind, key_limit, store_lse=False):
    """Returns (out, lse); lse (B*H, Lq) fp32 only when ``store_lse``."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    out = _token_major(q.shape, q.dtype, q.device)
    lse = new_empty((batch * heads, lq), torch.float32, q.device) if store_lse else None
    if out.numel() == 0:
        return out.to(q.dtype), lse
    block_m, block_n, block_d, num_warps, num_stages = _blocks(lq, lk, d)
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    grid = (batch * heads, triton.cdiv(lq, block_m))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask, key_limit, 1.0 / math.sqrt(d),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ms,
        heads, lq, lk, d,
        CAUSAL=causal, MASK_KIND=mask_kind, HAS_LIMIT=key_limit is not None, STORE_LSE=store_lse,
        UPCAST=interpreter_shortcuts() or q.dtype == torch.float32, PRECISION=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages)
    return out.to(q.dtype), lse


def _backward(q, k, v, g, lse, causal, mask, mask_kind, key_limit):
    """FlashAttention-2 backward: returns dq, dk, dv (B, H, L, D views in token-major memory)."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    g = g.to(q.dtype)
    dq = _token_major(q.shape, q.dtype, q.device)
    dk = _token_major(k.shape, k.dtype, k.device)
    dv = _token_major(v.shape, v.dtype, v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_().to(q.dtype), dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    (kv_m, kv_n), (q_m, q_n), block_d, num_warps, num_stages = _bwd_blocks(lq, lk, d)
    delta = new_empty((batch * heads, lq), torch.float32, q.device)  # written by the dQ kernel
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    common = dict(CAUSAL=causal, MASK_KIND=mask_kind, HAS_LIMIT=key_limit is not None,
                  UPCAST=interpreter_shortcuts() or q.dtype == torch.float32, PRECISION=dot_precision(q.dtype),
                  BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
    scale = 1.0 / math.sqrt(d)
    _attn_bwd_dq_kernel[(batch * heads, triton.cdiv(lq, q_m))](
        q, k, v, g, lse, delta, dq, mask, key_limit, scale,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *dq.stride(), *ms,
        heads, lq, lk, d, BLOCK_M=q_m, BLOCK_N=q_n, **common)
    _attn_bwd_dkdv_kernel[(batch * heads, triton.cdiv(lk, kv_n))](
        q, k, v, g, lse, delta, dk, dv, mask, key_limit, scale,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(), *dk.stride(), *dv.stride(), *ms,
        heads, lq, lk, d, BLOCK_M=kv_m, BLOCK_N=kv_n, **common)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, causal, kernel_mask, mask_kind, key_limit, grad_mode):
        ctx.causal, ctx.mask_kind = causal, mask_kind
        # needs_input_grad stays set under no_grad; the caller's grad mode says if backward can come.
        wants_grad = grad_mode and any(ctx.needs_input_grad[:4])
        ctx.recompute = attn_mask is not None and ctx.needs_input_grad[3]
        out, lse = _forward(q, k, v, causal, kernel_mask, mask_kind, key_limit,
                            store_lse=wants_grad and not ctx.recompute)
        if ctx.recompute:
            ctx.save_for_backward(q, k, v, attn_mask, key_limit)
        elif wants_grad:
            ctx.save_for_backward(q, k, v, lse, kernel_mask, key_limit)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.recompute:
            return (*_recompute_backward(ctx, g), None, None, None, None, None)
        q, k, v, lse, kernel_mask, key_limit = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, g, lse, ctx.causal, kernel_mask, ctx.mask_kind, key_limit)
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                None, None, None, None, None, None)


def _recompute_backward(ctx, g):
    """Gradients (q, k, v, mask) by differentiating SDPA under autograd. Only a float mask that
    requires grad comes here, so there is no causal flag and no key_limit (the argument rules)."""
    q, k, v, attn_mask, _ = ctx.saved_tensors
    needs = ctx.needs_input_grad
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(needs[i]) if t is not None else None
                  for i, t in enumerate((q, k, v, attn_mask))]
        out = torch.nn.functional.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3].to(q.dtype))
        wanted = [t for i, t in enumerate(leaves) if t is not None and needs[i]]
        grads = iter(torch.autograd.grad(out, wanted, g)) if wanted else iter(())
    return [next(grads) if t is not None and needs[i] else None for i, t in enumerate(leaves)]


def attention(q, k, v, causal: bool = False, attn_mask=None, key_limit=None):
    """q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh). Returns (B, H, Lq, Dh) in q's dtype."""
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)  # as SDPA under autocast
    check_tensors(q, k, v, attn_mask, key_limit)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects (B, H, L, Dh) tensors")
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    if k.shape != (batch, heads, lk, d) or v.shape != (batch, heads, lk, d):
        raise ValueError(f"k/v shapes {tuple(k.shape)}/{tuple(v.shape)} do not match q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError("q, k and v must share a dtype")
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the Triton attention kernel")
    # The same argument rules as the reference.
    if key_limit is not None:
        if causal or attn_mask is not None:
            raise ValueError("key_limit replaces the mask; pass neither causal nor attn_mask with it")
        if key_limit.shape != (batch,):
            raise ValueError(f"key_limit must have shape ({batch},), got {tuple(key_limit.shape)}")
        key_limit = key_limit.contiguous()
    if attn_mask is not None and causal:
        raise ValueError("pass either causal=True or attn_mask, not both")
    if causal and lq != lk:
        raise ValueError("causal attention needs as many queries as keys; use key_limit for a subset")

    kernel_mask, mask_kind = None, _NO_MASK
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            kernel_mask, mask_kind = attn_mask.expand(batch, heads, lq, lk).view(torch.uint8), _BOOL_MASK
        else:
            kernel_mask, mask_kind = attn_mask.to(q.dtype).expand(batch, heads, lq, lk), _FLOAT_MASK
    return _AttentionFn.apply(q, k, v, attn_mask, causal, kernel_mask, mask_kind, key_limit,
                              torch.is_grad_enabled())
