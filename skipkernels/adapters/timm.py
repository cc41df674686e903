"""timm: a ``VisionTransformer`` or ``Eva`` trunk inside open_clip's ``TimmModel`` (SigLIP,
SigLIP 2, EVA-02, ViTamin), and timm's ViT ``Block``.

Image tower: stem (patch embed, which for ViTamin is a convolutional network, class / register
tokens, positional embedding, patch dropout, norm_pre), blocks (Eva's with rotary embeddings,
which depend only on the patch grid), norm, timm's pooling ('token', 'avg', or 'map' attention
pooling) and head, then TimmModel's head.

Blocks the op layer computes: ``vision_transformer.Block`` with the plain ``Attention`` and
``Mlp`` (qk-norm, attention output norm, MLP norm, LayerScale), without stochastic depth or
dropout. Eva blocks run their own forward.
"""
from __future__ import annotations

import torch.nn as nn

from skipkernels.adapters.base import (UnsupportedModel, causal_mask_kwargs, hybrid_message, is_identity,
                                       mlp_activation_name)
from skipkernels.ops.block import BlockParts

TRUNKS = ("VisionTransformer", "Eva")
_HYBRID_HINTS = ("MobileCLIP", "FastViT", "MCi", "Hybrid")


def _kind(module) -> str:
    return type(module).__name__


def _is_timm(module) -> bool:
    return type(module).__module__.startswith("timm.")


# ------------------------------------------------------------------------------------ blocks
def read_block(block):
    """``BlockParts`` of a timm ViT ``Block``, why the op layer does not compute it, or None."""
    if not (_kind(block) == "Block" and _is_timm(block)):
        return None
    reason = _unsupported_reason(block)
    if reason is not None:
        return reason
    attn, mlp = block.attn, block.mlp
    return BlockParts(block.norm1, attn.qkv, ("weight", "bias"), attn.proj, attn.num_heads, attn.attn_drop.p,
                      attn.q_norm, attn.k_norm, None, attn.norm, None, block.ls1, block.norm2, mlp.fc1, mlp.act,
                      mlp.norm, mlp.fc2, block.ls2, mlp_activation_name(mlp.act), "x")


def _unsupported_reason(block) -> str | None:
    attn, mlp = block.attn, block.mlp
    if _kind(attn) != "Attention" or getattr(attn, "gate", None) is not None:
        return f"timm attention {_kind(attn)} (gated or not the plain one)"
    if attn.num_heads * attn.head_dim != attn.qkv.in_features:
        return "timm attention whose head width times heads differs from the model width"
    if _kind(mlp) != "Mlp" or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return f"timm MLP {_kind(mlp)}"
    if not (is_identity(block.drop_path1) and is_identity(block.drop_path2)):
        return "stochastic depth (drop_path)"
    if any(d.p for d in (attn.proj_drop, mlp.drop1, mlp.drop2)):
        return "dropout after the projections"
    return None


# ------------------------------------------------------------------------------------ towers
class TimmImageTower:
    """A timm VisionTransformer / Eva trunk in open_clip's TimmModel."""

    def __init__(self, visual):
        self.visual = visual
        self.trunk = trunk = visual.trunk
        self.kind = f"timm {_kind(trunk)}"
        self.blocks = trunk.blocks
        self.prefix_tokens = trunk.num_prefix_tokens  # class and register tokens
        self.rope = getattr(trunk, "rope", None)

    def stem(self, images):
        trunk = self.trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)
        if isinstance(x, tuple):  # Eva: (tokens, rotary embedding); the rotary part is block_kwargs'
            x = x[0]
        else:
            x = trunk.patch_drop(x)
        return trunk.norm_pre(x)

    def block_kwargs(self) -> dict:
        # Eva blocks take the rotary embedding of the patch grid (the same for every image).
        return {"rope": self.rope.get_embed()} if self.rope is not None else {}

    def head(self, x):
        x = self.trunk.forward_head(self.trunk.norm(x))
        return self.visual.head(x)

    def pruning_off_reason(self) -> str | None:
        trunk = self.trunk
        if getattr(trunk, "attn_pool", None) is not None:
            return "the image tower pools with attention ('map') over all tokens"
        if trunk.global_pool != "token" or trunk.num_prefix_tokens < 1:
            return f"the image tower pools by {trunk.global_pool!r}, not one token"
        return None

    def head_parameters(self):
        """Trainable under LSkip besides the blocks: norm, attention pool, fc_norm, head(s)."""
        trunk = self.trunk
        modules = [trunk.norm, getattr(trunk, "attn_pool", None), trunk.fc_norm, trunk.head, self.visual.head]
        return [p for m in modules if m is not None for p in m.parameters()]

    def token_dropping_off_reason(self) -> str | None:
        if self.rope is not None:
            return "rotary position embeddings are computed for the whole patch grid"
        return None

    def module_kwargs(self, x, causal: bool) -> dict:
        return causal_mask_kwargs(x, causal)

    def parameters(self):
        return self.visual.parameters()


def image_tower(visual) -> TimmImageTower:
    """The image tower of open_clip's ``TimmModel`` ``visual``; a clear error for trunks that are
    not one stack of ViT blocks."""
    trunk = _kind(visual.trunk)
    if trunk not in TRUNKS or not hasattr(visual.trunk, "blocks"):
        if any(h.lower() in trunk.lower() for h in _HYBRID_HINTS):
            raise UnsupportedModel(hybrid_message(f"timm {trunk}"))
        raise UnsupportedModel(f"the timm image trunk is {trunk}; only timm VisionTransformer and Eva trunks "
                               "(SigLIP, EVA-02) are supported, not convolutional ones (ConvNeXt, ResNet): "
                               "LSkip caches the tokens entering a transformer block")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in visual.trunk.patch_embed.modules()):
        # A convolutional stem is frozen and cached like any stem, but in train mode its BatchNorm
        # would normalise each cached batch differently from the model's own forward.
        raise UnsupportedModel(hybrid_message(f"timm {trunk} with a BatchNorm convolutional stem"))
    if getattr(visual.trunk, "rope_mixed", False):
        raise UnsupportedModel("Eva trunks with per-block ('mixed') rotary embeddings are not supported")
    if getattr(visual.trunk, "rope", None) is not None and getattr(visual.trunk, "patch_drop", None) is not None:
        raise UnsupportedModel("patch dropout with rotary embeddings is not supported (the kept patches' "
                               "rotary embeddings are not cached with them)")
    if getattr(visual.trunk, "dynamic_img_size", False):
        raise UnsupportedModel("timm trunks with dynamic image size are not supported")
    return TimmImageTower(visual)


# The timm image trunks of the shipped small SigLIP and EVA02 configs (configs/: the real models'
# block classes, pooling and masks at small widths and depths), registered with timm under these
# names so open_clip's TimmModel builds them: (timm module, class, constructor arguments).
TINY_TRUNKS = {
    "skipkernels_tiny_siglip_vit": ("vision_transformer", "VisionTransformer", dict(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, class_token=False, global_pool="map")),
    "skipkernels_tiny_eva02": ("eva", "Eva", dict(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, qkv_fused=False, mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
        global_pool="token")),
}


def register_tiny_trunks() -> None:
    """Registers ``TINY_TRUNKS`` with timm, so open_clip's TimmModel builds them by name."""
    import importlib

    from timm.models import register_model

    def entrypoint(name, module, cls, defaults):
        def create(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
            if pretrained:
                raise ValueError(f"{name} is a random-weight test trunk: it has no pretrained weights")
            return getattr(importlib.import_module(f"timm.models.{module}"), cls)(**{**defaults, **kwargs})
        create.__name__ = create.__qualname__ = name
        return create

    for name, (module, cls, defaults) in TINY_TRUNKS.items():
        register_model(entrypoint(name, module, cls, defaults))
