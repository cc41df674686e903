"""One transformer block, computed through the op layer: the one route through a block.

Handles both block types open_clip 3.3 builds, and timm's ViT block (SigLIP's image tower):
- ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (batch_first, packed in-projection);
- ``CustomResidualAttentionBlock`` with open_clip's ``Attention`` (qk-norm, head scale, inner and
  post-attention norms, MLP norm are supported; scaled-cosine attention is not);
- timm ``vision_transformer.Block`` with the plain ``Attention`` and ``Mlp`` (qk-norm, attention
  output norm, MLP norm, LayerScale), without stochastic depth or dropout.
Any other block (Eva, scaled-cosine) runs its own forward in ``skipkernels.skip.towers.run_blocks``;
``unsupported_reason`` says which.

Plain, patched, PET and LSkip blocks all run ``block_forward``. Parameter-efficient modules come
in as explicit ``BlockHooks`` (``skipkernels.pet.block_hooks`` builds them): a sub-layer hook
replaces that sub-layer's residual add, a LoRA hook adds its low-rank path to a projection's
output. LoRA on a weight the block reads as a tensor (a packed in-projection) needs no hook: the
weight itself reads W + ΔW.

``query_index`` (B,) turns on last-block pruning: only the rows at those token positions (the
pooled CLS / EOT token) get a query, a residual and an MLP; keys and values still come from
every token, and under ``causal`` the row at position p sees keys 0..p, as in the full block.
Pruning is exact with hooks that treat every token row on its own (``BlockHooks.row_wise``).

``policy``: the ``KernelPolicy`` (or backend name) every op of the block runs under; None: the
ambient one.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn as nn

from skipkernels.ops.attention import attention
from skipkernels.ops.layer_norm import layer_norm
from skipkernels.ops.layer_norm_linear import layer_norm_linear
from skipkernels.ops.layer_norm_mlp import layer_norm_mlp
from skipkernels.ops.linear import activation_reference, linear_act, linear_residual


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def apply_norm(module, x, policy=None):
    """A norm sub-module through the op layer when it is a LayerNorm, as-is otherwise."""
    if _is_identity(module):
        return x
    if _plain_layer_norm(module):
        return layer_norm(x, module.weight, module.bias, module.eps, backend=policy)
    return module(x)


def _plain_layer_norm(module) -> bool:
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def norm_linear(norm, x, weight, bias, activation: str, policy=None, lora=None):
    """``activation(norm(x) @ weight.T + bias)``; a LayerNorm goes through ``layer_norm_linear``,
    which may fuse it into the GEMM's prologue (LN→QKV, LN→fc1). ``lora``: a module whose output
    on norm(x) is added before the activation."""
    if lora is not None:
        h = apply_norm(norm, x, policy)
        return activation_reference(linear_act(h, weight, bias, "none", backend=policy) + lora(h).to(h.dtype),
                                    activation)
    if _plain_layer_norm(norm):
        return layer_norm_linear(x, norm.weight, norm.bias, norm.eps, weight, bias, activation, backend=policy)
    return linear_act(apply_norm(norm, x, policy), weight, bias, activation, backend=policy)


class BlockHooks(NamedTuple):
    """Parameter-efficient modules' changes to a block, applied by ``block_forward``.

    attn, mlp: ``hook(x, h, policy) -> x'`` replacing that sub-layer's residual add ``x + h``; h is
        the whole branch output (after the post-attention norm and LayerScale). None: ``x + h``.
    lora: role ("out", "fc1", "fc2") -> module whose output on the projection's input is added
        to the projection's output (LoRA on projections the block calls as modules).
    row_wise: every hook treats each token row on its own, so last-block pruning stays exact.
    """
    attn: Callable | None = None
    mlp: Callable | None = None
    lora: Mapping[str, nn.Module] = {}
    row_wise: bool = True


NO_HOOKS = BlockHooks()

# patch_clip keeps each routed block's policy under this attribute: its presence marks a block whose
# forward is block_forward (PET then leaves that forward alone and hands its modules in as hooks).
POLICY_ATTR = "_skipkernels_policy"


def routed_through_op_layer(block) -> bool:
    return POLICY_ATTR in block.__dict__


def model_policy(model):
    """The policy ``patch_clip`` gave ``model`` (None: the ambient one, or not patched)."""
    return model.__dict__.get(POLICY_ATTR)


def _residual_linear(x, weight, bias, residual, gamma, hook, lora, policy, norm=None):
    """``residual + gamma * norm(x @ weight.T + bias + lora(x))``, or ``hook(residual, branch)``:
    one op (the GEMM with its epilogue) where there is no hook, LoRA or norm."""
    if hook is None and lora is None and _is_identity(norm):
        return linear_residual(x, weight, bias, residual, gamma, backend=policy)
    h = linear_act(x, weight, bias, "none", backend=policy)
    if lora is not None:
        h = h + lora(x).to(h.dtype)
    h = apply_norm(norm, h, policy)
    if gamma is not None:
        h = h * gamma
    return residual + h if hook is None else hook(residual, h, policy)


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
    elif kind == "Block" and type(block).__module__.startswith("timm."):
        return _timm_unsupported_reason(block)
    else:
        return (f"{kind} is not an open_clip ResidualAttentionBlock / CustomResidualAttentionBlock or a "
                "timm ViT Block")
    if activation_name(block.mlp.gelu) is None and not callable(block.mlp.gelu):
        return f"MLP activation {type(block.mlp.gelu).__name__}"
    return None


def _timm_unsupported_reason(block) -> str | None:
    attn, mlp = block.attn, block.mlp
    if type(attn).__name__ != "Attention" or getattr(attn, "gate", None) is not None:
        return f"timm attention {type(attn).__name__} (gated or not the plain one)"
    if attn.num_heads * attn.head_dim != attn.qkv.in_features:
        return "timm attention whose head width times heads differs from the model width"
    if type(mlp).__name__ != "Mlp" or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return f"timm MLP {type(mlp).__name__}"
    if not (_is_identity(block.drop_path1) and _is_identity(block.drop_path2)):
        return "stochastic depth (drop_path)"
    if any(d.p for d in (attn.proj_drop, mlp.drop1, mlp.drop2)):
        return "dropout after the projections"
    return None


class BlockParts(NamedTuple):
    """A pre-norm block by role: x += ls_1(ln_attn(out(ln_inner(attention(ln_1(x)))))), then
    x += ls_2(fc2(mlp_ln(act(fc1(ln_2(x))))))."""
    ln_1: nn.Module
    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    heads: int
    dropout_p: float
    ln_q: nn.Module | None
    ln_k: nn.Module | None
    head_scale: torch.Tensor | None
    ln_inner: nn.Module | None
    ln_attn: nn.Module | None
    ls_1: nn.Module
    ln_2: nn.Module
    fc1: nn.Linear
    act: nn.Module
    mlp_ln: nn.Module | None
    fc2: nn.Linear
    ls_2: nn.Module


def block_parts(block) -> BlockParts:
    """The parts of an open_clip block or a timm ViT ``Block`` (same maths, other names)."""
    attn, mlp = block.attn, block.mlp
    if not hasattr(block, "ln_1"):  # timm: fused qkv Linear, q_norm / k_norm, norm before proj
        return BlockParts(block.norm1, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                          attn.num_heads, attn.attn_drop.p, attn.q_norm, attn.k_norm, None, attn.norm, None,
                          block.ls1, block.norm2, mlp.fc1, mlp.act, mlp.norm, mlp.fc2, block.ls2)
    if isinstance(attn, nn.MultiheadAttention):
        attention = (attn.num_heads, attn.dropout, None, None, None, None)
    else:
        attention = (attn.num_heads, attn.attn_drop.p, attn.ln_q, attn.ln_k, attn.head_scale, attn.ln_inner)
    return BlockParts(block.ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                      *attention, getattr(block, "ln_attn", None), block.ls_1, block.ln_2, mlp.c_fc, mlp.gelu,
                      getattr(mlp, "ln", None), mlp.c_proj, block.ls_2)


def block_forward(block, x, causal: bool = False, attn_mask=None, query_index=None, policy=None,
                  hooks: BlockHooks = NO_HOOKS):
    """x: (B, L, D). Returns (B, L, D), or (B, 1, D) rows at ``query_index`` when it is given."""
    parts = block_parts(block)
    (ln_1, w_in, b_in, w_out, b_out, heads, dropout_p, ln_q, ln_k, head_scale, ln_inner, ln_attn, ls_1, ln_2,
     fc1, act_module, mlp_ln, fc2, ls_2) = parts
    if dropout_p and block.training:
        raise ValueError("attention dropout during training is not supported by the op layer")
    if query_index is not None and not hooks.row_wise:
        raise ValueError("last-block pruning needs hooks that treat every token row on its own")
    batch, length, width = x.shape
    head_dim = width // heads

    if query_index is None:
        qkv = norm_linear(ln_1, x, w_in, b_in, "none", policy)
        q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        residual = x
        key_limit = None
    else:
        # Pruned block: keys/values from every token, a query only for the pooled rows (the norm
        # is per row, so normalising the gathered rows equals gathering the normalised ones).
        rows = torch.arange(batch, device=x.device)
        kv = norm_linear(ln_1, x, w_in[width:], None if b_in is None else b_in[width:], "none", policy)
        k, v = kv.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        residual = x[rows, query_index].unsqueeze(1)
        q = norm_linear(ln_1, residual, w_in[:width], None if b_in is None else b_in[:width], "none", policy)
        q = q.view(batch, 1, heads, head_dim).transpose(1, 2)
        if attn_mask is not None:
            raise ValueError("query_index supports the causal mask or no mask, not a custom attn_mask")
        key_limit = (query_index + 1) if causal else None
        causal = False
    q = apply_norm(ln_q, q, policy)
    k = apply_norm(ln_k, k, policy)
    if key_limit is not None:
        a = attention(q, k, v, key_limit=key_limit, backend=policy)
    else:
        a = attention(q, k, v, causal=causal, attn_mask=attn_mask, backend=policy)
    if head_scale is not None:
        a = a * head_scale
    a = a.transpose(1, 2).reshape(residual.shape[0], residual.shape[1], width)
    a = apply_norm(ln_inner, a, policy)

    lora = hooks.lora
    x = _residual_linear(a, w_out, b_out, residual, layer_scale(ls_1), hooks.attn, lora.get("out"), policy,
                         norm=ln_attn)

    act = activation_name(act_module)
    if (act is not None and _plain_layer_norm(ln_2) and _is_identity(mlp_ln) and hooks.mlp is None
            and lora.get("fc1") is None and lora.get("fc2") is None):
        # The common MLP: one op, which may keep fc1's pre-activation instead of its output.
        return layer_norm_mlp(x, ln_2.weight, ln_2.bias, ln_2.eps, fc1.weight, fc1.bias, act,
                              fc2.weight, fc2.bias, layer_scale(ls_2), backend=policy)
    if act is not None:
        h = norm_linear(ln_2, x, fc1.weight, fc1.bias, act, policy, lora.get("fc1"))
    else:
        h = act_module(fc1(apply_norm(ln_2, x, policy)))
    h = apply_norm(mlp_ln, h, policy)
    return _residual_linear(h, fc2.weight, fc2.bias, x, layer_scale(ls_2), hooks.mlp, lora.get("fc2"), policy)


def blocks_forward(blocks, x, causal: bool = False, attn_mask=None, prune_last_index=None, policy=None):
    """Run a sequence of blocks; with ``prune_last_index`` the last one is pruned to those rows."""
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        index = prune_last_index if last else None
        x = block_forward(block, x, causal=causal, attn_mask=attn_mask, query_index=index, policy=policy)
    return x
