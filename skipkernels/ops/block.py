"""One open_clip transformer block, computed through the op layer.

Handles both block types open_clip 3.3 builds:
- ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (batch_first, packed in-projection);
- ``CustomResidualAttentionBlock`` with open_clip's ``Attention`` (qk-norm, head scale, inner and
  post-attention norms, MLP norm are supported; scaled-cosine attention is not).
Any other block (timm, Eva, scaled-cosine, a block holding PET modules) runs its own forward in
``skipkernels.skip.towers.run_blocks``; ``unsupported_reason`` says which.

``query_index`` (B,) turns on last-block pruning: only the rows at those token positions (the
pooled CLS / EOT token) get a query, a residual and an MLP; keys and values still come from
every token, and under ``causal`` the row at position p sees keys 0..p, as in the full block.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from skipkernels.ops.attention import attention
from skipkernels.ops.layer_norm import layer_norm
from skipkernels.ops.layer_norm_linear import layer_norm_linear
from skipkernels.ops.layer_norm_mlp import layer_norm_mlp
from skipkernels.ops.linear import linear_act, linear_residual


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def apply_norm(module, x):
    """A norm sub-module through the op layer when it is a LayerNorm, as-is otherwise."""
    if _is_identity(module):
        return x
    if _plain_layer_norm(module):
        return layer_norm(x, module.weight, module.bias, module.eps)
    return module(x)


def _plain_layer_norm(module) -> bool:
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def norm_linear(norm, x, weight, bias, activation: str):
    """``activation(norm(x) @ weight.T + bias)``; a LayerNorm goes through ``layer_norm_linear``,
    which may fuse it into the GEMM's prologue (LN→QKV, LN→fc1)."""
    if _plain_layer_norm(norm):
        return layer_norm_linear(x, norm.weight, norm.bias, norm.eps, weight, bias, activation)
    return linear_act(apply_norm(norm, x), weight, bias, activation)


def activation_name(module) -> str | None:
    """The op-layer name of an MLP activation module, or None when it is something else."""
    if type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return None


def layer_scale(module):
    """The LayerScale vector of ``ls_1``/``ls_2``, or None when it is an identity."""
    if _is_identity(module):
        return None
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise TypeError(f"unsupported layer-scale module {type(module).__name__}")
    return gamma


def unsupported_reason(block) -> str | None:
    """Why the op layer cannot compute ``block`` (it then runs its own forward), or None."""
    kind = type(block).__name__
    if kind == "ResidualAttentionBlock":
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention):
            return f"ResidualAttentionBlock.attn is {type(attn).__name__}, not nn.MultiheadAttention"
        if not attn.batch_first:
            return "attention with batch_first=False"
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            return "nn.MultiheadAttention with separate k/v dims, bias_k/v or add_zero_attn"
        if hasattr(block, "ln_1_kv"):
            return "cross-attention block (CoCa decoder)"
    elif kind == "CustomResidualAttentionBlock":
        if getattr(block.attn, "logit_scale", None) is not None:
            return "scaled-cosine attention (scaled_cosine_attn=True)"
    else:
        return f"{kind} is not an open_clip ResidualAttentionBlock or CustomResidualAttentionBlock"
    if activation_name(block.mlp.gelu) is None and not callable(block.mlp.gelu):
        return f"MLP activation {type(block.mlp.gelu).__name__}"
    return None


def _attention_params(block):
    attn = block.attn
    if isinstance(attn, nn.MultiheadAttention):
        return (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                attn.num_heads, attn.dropout, None, None, None, None)
    return (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
            attn.num_heads, attn.attn_drop.p, attn.ln_q, attn.ln_k, attn.head_scale, attn.ln_inner)


def block_forward(block, x, causal: bool = False, attn_mask=None, query_index=None):
    """x: (B, L, D). Returns (B, L, D), or (B, 1, D) rows at ``query_index`` when it is given."""
    (w_in, b_in, w_out, b_out, heads, dropout_p, ln_q, ln_k, head_scale, ln_inner) = _attention_params(block)
    if dropout_p and block.training:
        raise ValueError("attention dropout during training is not supported by the op layer")
    batch, length, width = x.shape
    head_dim = width // heads

    if query_index is None:
        qkv = norm_linear(block.ln_1, x, w_in, b_in, "none")
        q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        residual = x
        key_limit = None
    else:
        # Pruned block: keys/values from every token, a query only for the pooled rows (the norm
        # is per row, so normalising the gathered rows equals gathering the normalised ones).
        rows = torch.arange(batch, device=x.device)
        kv = norm_linear(block.ln_1, x, w_in[width:], None if b_in is None else b_in[width:], "none")
        k, v = kv.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        residual = x[rows, query_index].unsqueeze(1)
        q = norm_linear(block.ln_1, residual, w_in[:width], None if b_in is None else b_in[:width], "none")
        q = q.view(batch, 1, heads, head_dim).transpose(1, 2)
        if attn_mask is not None:
            raise ValueError("query_index supports the causal mask or no mask, not a custom attn_mask")
        key_limit = (query_index + 1) if causal else None
        causal = False
    q = apply_norm(ln_q, q)
    k = apply_norm(ln_k, k)
    if key_limit is not None:
        a = attention(q, k, v, key_limit=key_limit)
    else:
        a = attention(q, k, v, causal=causal, attn_mask=attn_mask)
    if head_scale is not None:
        a = a * head_scale
    a = a.transpose(1, 2).reshape(residual.shape[0], residual.shape[1], width)
    a = apply_norm(ln_inner, a)

    ln_attn = getattr(block, "ln_attn", None)
    if _is_identity(ln_attn):
        x = linear_residual(a, w_out, b_out, residual, layer_scale(block.ls_1))
    else:
        y = apply_norm(ln_attn, linear_act(a, w_out, b_out, "none"))
        gamma = layer_scale(block.ls_1)
        x = residual + (y if gamma is None else y * gamma)

    mlp = block.mlp
    act = activation_name(mlp.gelu)
    if act is not None and _plain_layer_norm(block.ln_2) and _is_identity(getattr(mlp, "ln", None)):
        # The common MLP: one op, which may keep fc1's pre-activation instead of its output.
        ln_2 = block.ln_2
        return layer_norm_mlp(x, ln_2.weight, ln_2.bias, ln_2.eps, mlp.c_fc.weight, mlp.c_fc.bias, act,
                              mlp.c_proj.weight, mlp.c_proj.bias, layer_scale(block.ls_2))
    if act is not None:
        h = norm_linear(block.ln_2, x, mlp.c_fc.weight, mlp.c_fc.bias, act)
    else:
        h = mlp.gelu(mlp.c_fc(apply_norm(block.ln_2, x)))
    h = apply_norm(getattr(mlp, "ln", None), h)
    return linear_residual(h, mlp.c_proj.weight, mlp.c_proj.bias, x, layer_scale(block.ls_2))


def blocks_forward(blocks, x, causal: bool = False, attn_mask=None, prune_last_index=None):
    """Run a sequence of blocks; with ``prune_last_index`` the last one is pruned to those rows."""
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        if last and prune_last_index is not None:
            x = block_forward(block, x, causal=causal, attn_mask=attn_mask, query_index=prune_last_index)
        else:
            x = block_forward(block, x, causal=causal, attn_mask=attn_mask)
    return x
