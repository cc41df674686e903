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

Backward is NOT a Triton kernel: the autograd Function saves q, k, v (and the mask) and, on
backward, recomputes the reference (``F.scaled_dot_product_attention``, i.e. PyTorch's flash /
memory-efficient / math kernels) under autograd and differentiates that. Gradients are therefore
exactly the reference's; the cost is one extra attention forward in backward.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from skipkernels.triton import autocast_inputs, check_tensors, interpreting, new_empty, store_dtype

_INTERPRET = interpreting()

_NO_MASK, _FLOAT_MASK, _BOOL_MASK = 0, 1, 2


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, Mask, KeyLimit, sm_scale,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sob, soh, som, sod, smb, smh, smm, smn,
                     H, Lq, Lk, D,
                     CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_LIMIT: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
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
    if MASK_KIND != 0:
        m_base = Mask + b.to(tl.int64) * smb + h * smh

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
        s = tl.dot(q, k, input_precision=PRECISION) * sm_scale
        valid = nmask[None, :] & mmask[:, None]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        if MASK_KIND == 1:
            am = tl.load(m_base + offs_m[:, None] * smm + cols[None, :] * smn, mask=valid, other=0.0)
            s += am.to(tl.float32)
        if MASK_KIND == 2:
            keep = tl.load(m_base + offs_m[:, None] * smm + cols[None, :] * smn, mask=valid, other=0)
            valid = valid & (keep != 0)
        s = tl.where(valid, s, float("-inf"))
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


def _blocks(lq, lk, d):
    block_d = max(16, triton.next_power_of_2(d))
    if _INTERPRET:
        # Per-operation cost under the interpreter: whole (small) sequences per tile.
        return (min(128, max(16, triton.next_power_of_2(lq))),
                min(128, max(16, triton.next_power_of_2(lk))), block_d, 4, 1)
    # A pooled single query (pruned last block) needs only a 16-row tile.
    block_m = 16 if lq <= 16 else (64 if lq <= 256 or block_d > 64 else 128)
    block_n = 64 if block_d <= 64 else 32
    num_warps = 4 if block_m <= 64 else 8
    return block_m, block_n, block_d, num_warps, 2


def _precision(dtype):
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _forward(q, k, v, causal, mask, mask_kind, key_limit):
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    sd = store_dtype(q.dtype)
    # (B, Lq, H, D) memory, (B, H, Lq, D) view: the caller's transpose back to tokens is free.
    out = new_empty((batch, lq, heads, d), sd, q.device).permute(0, 2, 1, 3)
    if out.numel() == 0:
        return out.to(q.dtype)
    block_m, block_n, block_d, num_warps, num_stages = _blocks(lq, lk, d)
    ms = mask.stride() if mask is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(lq, block_m), batch * heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, mask, key_limit, 1.0 / math.sqrt(d),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *ms,
        heads, lq, lk, d,
        CAUSAL=causal, MASK_KIND=mask_kind, HAS_LIMIT=key_limit is not None,
        UPCAST=_INTERPRET or q.dtype == torch.float32, PRECISION=_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages)
    return out.to(q.dtype)


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, causal, kernel_mask, mask_kind, key_limit):
        ctx.causal = causal
        ctx.save_for_backward(q, k, v, attn_mask, key_limit)
        return _forward(q, k, v, causal, kernel_mask, mask_kind, key_limit)

    @staticmethod
    def backward(ctx, g):
        # Recompute with the reference under autograd and differentiate it (see module docstring).
        from skipkernels.ops.attention import attention_reference
        q, k, v, attn_mask, key_limit = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(needs[i]) if t is not None else None
                      for i, t in enumerate((q, k, v, attn_mask))]
            out = attention_reference(*leaves[:3], causal=ctx.causal, attn_mask=leaves[3],
                                      key_limit=key_limit)
            wanted = [t for i, t in enumerate(leaves) if t is not None and needs[i]]
            grads = iter(torch.autograd.grad(out, wanted, g)) if wanted else iter(())
        result = [next(grads) if t is not None and needs[i] else None for i, t in enumerate(leaves)]
        return (*result, None, None, None, None)


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
    return _AttentionFn.apply(q, k, v, attn_mask, causal, kernel_mask, mask_kind, key_limit)
