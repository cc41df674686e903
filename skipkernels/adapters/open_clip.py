"""open_clip: ``CLIP`` and ``CustomTextCLIP`` models, their ``VisionTransformer`` image tower and
text transformer, and their blocks (``ResidualAttentionBlock`` with ``nn.MultiheadAttention``,
``CustomResidualAttentionBlock`` with open_clip's ``Attention``). A ``TimmModel`` image tower is
the timm adapter's (``skipkernels.adapters.timm``).

Blocks the op layer computes: ``ResidualAttentionBlock`` (batch_first, packed in-projection, no
cross-attention) and ``CustomResidualAttentionBlock`` (qk-norm, head scale, inner and
post-attention norms, MLP norm; not scaled-cosine attention).

Refused, with the reason: ResNet and hybrid image towers (their stages are not one stack of token
blocks, so there is no block omega to cache at), Hugging Face text towers inside open_clip models,
CoCa, text towers with a class token or a padding mask.
"""
from __future__ import annotations

import types

import torch.nn as nn

from skipkernels.adapters import timm as timm_adapter
from skipkernels.adapters.base import (PROMPT_POSITION_TEXT_POOLS, SINGLE_TOKEN_TEXT_POOLS, PetBlock, SubLayer,
                                       UnsupportedModel, causal_mask_kwargs, hybrid_message, mask_kind,
                                       mlp_activation_name)
from skipkernels.ops.block import BlockParts

BLOCKS = ("ResidualAttentionBlock", "CustomResidualAttentionBlock")
_HYBRID_HINTS = ("MobileCLIP", "FastViT", "MCi", "Hybrid")


def _kind(module) -> str:
    return type(module).__name__


def is_block(module) -> bool:
    return _kind(module) in BLOCKS


# ------------------------------------------------------------------------------------ blocks
def read_block(block):
    """``BlockParts`` of an open_clip block, why the op layer does not compute it, or None (not
    an open_clip block)."""
    if not is_block(block):
        return None
    reason = _unsupported_reason(block)
    if reason is not None:
        return reason
    attn, mlp = block.attn, block.mlp
    if isinstance(attn, nn.MultiheadAttention):
        attention = (attn.num_heads, attn.dropout, None, None, None, None)
    else:
        scaled = attn if getattr(attn, "head_scale", None) is not None else None
        attention = (attn.num_heads, attn.attn_drop.p, attn.ln_q, attn.ln_k, scaled, attn.ln_inner)
    return BlockParts(block.ln_1, attn, ("in_proj_weight", "in_proj_bias"), attn.out_proj, *attention,
                      getattr(block, "ln_attn", None), block.ls_1, block.ln_2, mlp.c_fc, mlp.gelu,
                      getattr(mlp, "ln", None), mlp.c_proj, block.ls_2, mlp_activation_name(mlp.gelu), "x")


def _unsupported_reason(block) -> str | None:
    if _kind(block) == "ResidualAttentionBlock":
        attn = block.attn
        if not isinstance(attn, nn.MultiheadAttention):
            return f"ResidualAttentionBlock.attn is {_kind(attn)}, not nn.MultiheadAttention"
        if not attn.batch_first:
            return "attention with batch_first=False"
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            return "nn.MultiheadAttention with separate k/v dims, bias_k/v or add_zero_attn"
        if hasattr(block, "ln_1_kv"):
            return "cross-attention block (CoCa decoder)"
    elif getattr(block.attn, "logit_scale", None) is not None:
        return "scaled-cosine attention (scaled_cosine_attn=True)"
    if mlp_activation_name(block.mlp.gelu) is None and not callable(block.mlp.gelu):
        return f"MLP activation {_kind(block.mlp.gelu)}"
    return None


# ----------------------------------------------------------------------- PET: where modules attach
def pet_block(name, module):
    """An open_clip block's PET attach points: its ``attn`` and ``mlp`` sub-layers, whose residual
    adds PET's modifiers own (``clip_block_forward``, or the op layer's plan as hooks)."""
    if not is_block(module):
        return None
    attn = module.attn
    token_dim = 1 if getattr(attn, "batch_first", True) else 0
    return PetBlock(name, module, -1, "clip", module.mlp.c_fc.in_features, is_decoder=hasattr(module, "ln_1_kv"),
                    token_dim=token_dim, sublayers={"attn": SubLayer("attn"), "mlp": SubLayer("mlp")},
                    forward=types.MethodType(clip_block_forward, module))


def _modify(block, kind, x, h):
    modifier = block._modules.get(f"pet_{kind}")
    return x + h if modifier is None else modifier(x, h)


def clip_block_forward(self, x, *args, attn_mask=None):
    """open_clip's block forward with the PET sub-layer modifiers ``pet_attn``/``pet_mlp`` owning
    the residual adds. With no modifier it is open_clip's own computation, op for op.

    Accepts ResidualAttentionBlock's (q_x, k_x, v_x, attn_mask), the custom block's (x, attn_mask)
    and open_clip's gradient-checkpointing call (x, None, None, attn_mask) for either.
    """
    k_x = v_x = None
    if len(args) == 3:
        k_x, v_x, attn_mask = args
    elif len(args) == 1:
        attn_mask = args[0]
    elif args:
        raise TypeError(f"unexpected block arguments: {len(args) + 1} positional")
    if _kind(self) == "ResidualAttentionBlock":
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
        h = self.ls_1(self.attention(q_x=self.ln_1(x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
    else:
        if k_x is not None or v_x is not None:
            raise ValueError("CustomResidualAttentionBlock takes no cross-attention inputs")
        h = self.ls_1(self.ln_attn(self.attn(self.ln_1(x), attn_mask=attn_mask)))
    x = _modify(self, "attn", x, h)
    h = self.ls_2(self.mlp(self.ln_2(x)))
    return _modify(self, "mlp", x, h)


# ------------------------------------------------------------------------------------ towers
class OpenClipImageTower:
    """open_clip's VisionTransformer: stem (patch conv, class token, positional embedding, patch
    dropout, ln_pre), blocks, pool + ln_post, proj."""

    kind = "open_clip VisionTransformer"

    def __init__(self, visual):
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.prefix_tokens = 1  # the class token

    def stem(self, images):
        return self.visual._embeds(images)

    def block_kwargs(self) -> dict:
        return {}

    def head(self, x):
        """Pool, ln_post and project the last block's output ((B, L, D), or the pruned (B, 1, D))."""
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def pruning_off_reason(self) -> str | None:
        if getattr(self.visual, "attn_pool", None) is not None:
            return "the image tower pools with an attentional pooler"
        if self.visual.pool_type != "tok":
            return f"the image tower pools by {self.visual.pool_type!r}, not one token"
        return None

    def head_parameters(self):
        """Trainable under LSkip besides the blocks: ln_post, proj (and an attentional pooler)."""
        visual = self.visual
        modules = [visual.ln_post, getattr(visual, "attn_pool", None), getattr(visual, "attn_pool_contrastive", None)]
        params = [p for m in modules if m is not None for p in m.parameters()]
        return params + ([visual.proj] if isinstance(visual.proj, nn.Parameter) else [])

    def token_dropping_off_reason(self) -> str | None:
        return None

    def module_kwargs(self, x, causal: bool) -> dict:
        return causal_mask_kwargs(x, causal)

    def parameters(self):
        return self.visual.parameters()


class TextTower:
    """open_clip's text transformer: ``holder`` is the CLIP model itself (its text parts are flattened
    into it) or CustomTextCLIP's ``text`` module; the part names are the same."""

    kind = "open_clip text transformer"

    def __init__(self, holder, pool_type: str, eos_id):
        self.holder = holder
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.blocks = holder.transformer.resblocks
        self.token_embedding = holder.token_embedding
        self.positional_embedding = holder.positional_embedding
        self.ln_final = holder.ln_final
        self.text_projection = holder.text_projection

    @property
    def mask_kind(self) -> str:
        return mask_kind(self.holder.attn_mask)

    @property
    def causal(self) -> bool:
        return self.mask_kind == "causal"

    def cast_dtype(self):
        return self.holder.transformer.get_cast_dtype()

    def truncation_off_reason(self) -> str | None:
        if not self.causal:
            return "the text attention is not causal, so every token reaches the pooled one"
        if self.pool_type not in PROMPT_POSITION_TEXT_POOLS:
            return f"the text is pooled by {self.pool_type!r}, not at a position in the prompt"
        return None

    def pruning_off_reason(self) -> str | None:
        if self.pool_type not in SINGLE_TOKEN_TEXT_POOLS:
            return f"the text is pooled by {self.pool_type!r}, not one token"
        return None

    def head_parameters(self):
        params = list(self.ln_final.parameters())
        projection = self.text_projection
        if isinstance(projection, nn.Parameter):
            params.append(projection)
        elif isinstance(projection, nn.Module):
            params += list(projection.parameters())
        return params

    def module_kwargs(self, x, causal: bool) -> dict:
        return causal_mask_kwargs(x, causal)


def image_tower(model):
    visual = getattr(model, "visual", None)
    kind = _kind(visual)
    if kind == "VisionTransformer":
        return OpenClipImageTower(visual)
    if kind == "TimmModel":
        return timm_adapter.image_tower(visual)
    if kind == "ModifiedResNet":
        raise UnsupportedModel("the image tower is ModifiedResNet; only ViT image towers (open_clip "
                               "VisionTransformer, timm VisionTransformer / Eva) are supported, not ResNet or "
                               "ConvNeXt towers: LSkip caches the tokens entering a transformer block")
    if any(h.lower() in kind.lower() for h in _HYBRID_HINTS):
        raise UnsupportedModel(hybrid_message(kind))
    raise UnsupportedModel(f"the image tower is {kind}; only ViT image towers (open_clip VisionTransformer, timm "
                           "VisionTransformer / Eva) are supported")


def text_tower(model) -> TextTower:
    if _kind(model) == "CLIP" and hasattr(model, "token_embedding"):
        return TextTower(model, getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None))
    text = getattr(model, "text", None)
    if _kind(text) != "TextTransformer":
        raise UnsupportedModel(f"the text tower is {_kind(text)}; only open_clip's own text transformer "
                               "is supported, not Hugging Face text towers")
    if getattr(text, "cls_emb", None) is not None:
        raise UnsupportedModel("text towers with an appended class token (CoCa style) are not supported")
    if getattr(text, "use_pad_mask", False):
        raise UnsupportedModel("text towers with a padding mask are not supported")
    return TextTower(text, text.pool_type, getattr(text, "eos_id", None))


def model_towers(model):
    """(image tower, text tower) of an open_clip model; a clear error otherwise."""
    kind = _kind(model)
    if kind in ("CoCa",):
        raise UnsupportedModel("CoCa models are not supported: their text decoder and attentional pooler "
                               "differ from CLIP; use an open_clip CLIP model")
    if kind not in ("CLIP", "CustomTextCLIP") or not hasattr(model, "visual"):
        raise UnsupportedModel(f"expected an open_clip CLIP or CustomTextCLIP model, got {kind}")
    return image_tower(model), text_tower(model)


def is_paper_model(model) -> bool:
    """An open_clip ``CLIP`` with its own ViT image tower (the paper's models)."""
    return _kind(model) == "CLIP" and hasattr(getattr(model, "visual", None), "transformer")


def folder_tokenizer(folder: str, context_length: int, **kwargs):
    """open_clip's wrapper of a Hugging Face tokenizer saved in ``folder``."""
    from open_clip.tokenizer import HFTokenizer
    return HFTokenizer(folder, context_length=context_length, **kwargs)
