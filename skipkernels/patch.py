"""patch_clip / unpatch_clip: route an open_clip CLIP model's transformer blocks through the op layer.

Only ``forward`` is rebound, as an instance attribute of each block: parameters, their names,
buffers and the state_dict stay exactly as open_clip made them, so checkpoints load either way.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from skipkernels.ops.block import block_forward, check_block

_PATCHED_FLAG = "_skipkernels_patched"


def clip_towers(model: nn.Module):
    """Validate that ``model`` is an open_clip CLIP with ViT image and text towers; return
    (image transformer blocks, text transformer blocks)."""
    kind = type(model).__name__
    if kind in ("CoCa",):
        raise TypeError("CoCa models are not supported: their text decoder and attentional pooler "
                        "differ from CLIP; use an open_clip CLIP model")
    if kind == "CustomTextCLIP":
        raise TypeError("CustomTextCLIP (a Hugging Face or custom text tower) is not supported; "
                        "use an open_clip CLIP model whose text tower is open_clip's own transformer")
    if kind != "CLIP" or not hasattr(model, "visual") or not hasattr(model, "token_embedding"):
        raise TypeError(f"expected an open_clip CLIP model, got {kind}")
    visual = model.visual
    if type(visual).__name__ != "VisionTransformer":
        raise TypeError(f"the image tower is {type(visual).__name__}; only open_clip VisionTransformer "
                        "(ViT) image towers are supported, not ResNet or timm towers")
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("image towers with an attentional pooler are not supported")
    if getattr(model, "attn_mask", None) is None:
        raise ValueError("text towers without a causal mask are not supported")
    image_blocks = list(visual.transformer.resblocks)
    text_blocks = list(model.transformer.resblocks)
    for block in image_blocks + text_blocks:
        check_block(block)
    return image_blocks, text_blocks


def _patched_forward(self, x, *args, attn_mask=None):
    # ResidualAttentionBlock.forward(q_x, k_x, v_x, attn_mask) and open_clip's gradient
    # checkpointing passes (x, None, None, attn_mask) positionally; Custom blocks take (x, attn_mask).
    if len(args) == 3:
        k_x, v_x, attn_mask = args
        if k_x is not None or v_x is not None:
            raise ValueError("cross-attention inputs are not supported by patched blocks")
    elif len(args) == 1:
        attn_mask = args[0]
    elif args:
        raise TypeError(f"unexpected block arguments: {len(args) + 1} positional")
    return block_forward(self, x, attn_mask=attn_mask)


def _encode_text(self, text, normalize: bool = False):
    # Exact savings (DESIGN.md section 3): causal attention pooled at one token per prompt, so the
    # prompts run only up to their last pooled position, and the last block only for that row.
    from skipkernels.skip import towers
    features = towers.encode_text(self, text)
    return F.normalize(features, dim=-1) if normalize else features


def _encode_image(self, image, normalize: bool = False):
    from skipkernels.skip import towers
    features = towers.encode_image(self, image)
    return F.normalize(features, dim=-1) if normalize else features


def _text_savings_apply(model) -> bool:
    """Truncation and pruning are exact only for a causal mask and single-token pooling."""
    if getattr(model, "text_pool_type", None) not in ("argmax", "eos", "first", "last"):
        return False
    mask = model.attn_mask
    causal = torch.full(mask.shape, float("-inf"), device=mask.device, dtype=mask.dtype).triu_(1)
    return mask.dim() == 2 and torch.equal(mask, causal)


def patch_clip(model: nn.Module) -> nn.Module:
    """Rebind every transformer block of both towers to the op layer, and ``encode_text`` /
    ``encode_image`` to the tower path with the exact savings where they apply. Returns ``model``."""
    image_blocks, text_blocks = clip_towers(model)
    for block in image_blocks + text_blocks:
        block.forward = types.MethodType(_patched_forward, block)
    if _text_savings_apply(model):
        model.encode_text = types.MethodType(_encode_text, model)
    if getattr(model.visual, "output_tokens", False) is False:
        model.encode_image = types.MethodType(_encode_image, model)
    setattr(model, _PATCHED_FLAG, True)
    return model


def unpatch_clip(model: nn.Module) -> nn.Module:
    """Restore open_clip's own forwards. Returns ``model``."""
    image_blocks, text_blocks = clip_towers(model)
    for block in image_blocks + text_blocks:
        block.__dict__.pop("forward", None)
    for name in ("encode_text", "encode_image", _PATCHED_FLAG):
        model.__dict__.pop(name, None)
    return model


def is_patched(model: nn.Module) -> bool:
    return bool(getattr(model, _PATCHED_FLAG, False))
