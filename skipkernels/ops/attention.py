"""Multi-head attention core: softmax(q kᵀ / sqrt(d) + mask) v.

Reference: ``F.scaled_dot_product_attention`` (PyTorch picks flash / efficient / math).
``causal=True`` is the text tower's mask. ``key_limit`` (B,) restricts each query to keys
``< key_limit[b]`` and is how last-block pruning keeps the causal rule for the pooled row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skipkernels.ops.op import Op, Triton, register
from skipkernels.ops.policy import Backend


def attention_reference(q, k, v, causal: bool = False, attn_mask=None, key_limit=None):
    """q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh). Returns (B, H, Lq, Dh)."""
    if key_limit is not None:
        if causal or attn_mask is not None:
            raise ValueError("key_limit replaces the mask; pass neither causal nor attn_mask with it")
        keys = torch.arange(k.shape[-2], device=k.device)
        attn_mask = (keys[None, :] < key_limit[:, None])[:, None, None, :]  # (B,1,1,Lk) bool
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if attn_mask is not None:
        if causal:
            raise ValueError("pass either causal=True or attn_mask, not both")
        if attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError("causal attention needs as many queries as keys; use key_limit for a subset")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attention_case(q, k, v, causal: bool = False, attn_mask=None, key_limit=None):
    """The measured table's key: (head dim, mask kind, pooled query or full) and B·H·Lk."""
    mask = "key_limit" if key_limit is not None else "causal" if causal else "mask" if attn_mask is not None else "none"
    return (q.shape[-1], mask, "pooled" if q.shape[-2] == 1 else "full"), q.shape[0] * q.shape[1] * k.shape[-2]


# auto without a measured win: SDPA, which itself picks flash / cuDNN / memory-efficient kernels.
ATTENTION = register(Op("attention", attention_reference, case=attention_case,
                        impls=(Triton("attention", "attention"),)))


def attention(q, k, v, causal: bool = False, attn_mask=None, key_limit=None, backend: Backend = None):
    return ATTENTION(q, k, v, causal=causal, attn_mask=attn_mask, key_limit=key_limit, backend=backend)
