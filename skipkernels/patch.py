"""patch_clip / unpatch_clip: route an open_clip model's transformer blocks through the op layer.

Supported families: ``skipkernels.families`` (CLIP and CustomTextCLIP with an open_clip or timm
ViT / Eva image tower and open_clip's text transformer). Only ``forward`` is rebound, as an
instance attribute of each block the op layer computes (the others, e.g. timm and Eva blocks,
keep their own): parameters, their names, buffers and the state_dict stay exactly as open_clip
made them, so checkpoints load either way.
"""
from __future__ import annotations

import types

import torch.nn as nn
import torch.nn.functional as F

from skipkernels.families import model_towers
from skipkernels.ops.block import POLICY_ATTR, block_forward, unsupported_reason
from skipkernels.pet import block_has_pet, block_hooks
from skipkernels.pet.layouts import clip_block_forward
from skipkernels.skip import towers

_PATCHED_FLAG = "_skipkernels_patched"


def fused_blocks(model: nn.Module) -> list:
    """Validate that ``model`` is a supported open_clip model (a clear error otherwise); return the
    blocks of both towers that the op layer computes."""
    image, text = model_towers(model)
    return [b for b in list(image.blocks) + list(text.blocks) if unsupported_reason(b) is None]


def _patched_forward(self, x, *args, attn_mask=None, is_causal: bool = False):
    # ResidualAttentionBlock.forward(q_x, k_x, v_x, attn_mask) and open_clip's gradient
    # checkpointing passes (x, None, None, attn_mask) positionally; Custom blocks take (x, attn_mask),
    # timm blocks (x, attn_mask, is_causal).
    if len(args) == 3:
        k_x, v_x, attn_mask = args
        if k_x is not None or v_x is not None:
            raise ValueError("cross-attention inputs are not supported by patched blocks")
    elif len(args) == 1:
        attn_mask = args[0]
    elif args:
        raise TypeError(f"unexpected block arguments: {len(args) + 1} positional")
    hooks = block_hooks(self)
    if hooks is None:  # PET modules the op layer would not apply: open_clip's forward with them
        return clip_block_forward(self, x, attn_mask=attn_mask)
    return block_forward(self, x, causal=is_causal, attn_mask=attn_mask, policy=self.__dict__[POLICY_ATTR],
                         hooks=hooks)


def _encode_text(self, text, normalize: bool = False):
    # Exact savings (docs/ARCHITECTURE.md, "The algorithm"), each only where it is exact: causal
    # attention pooled at one position per prompt runs only up to the last pooled position; the
    # last block computes only the pooled row.
    features = towers.encode_text(self, text, policy=self.__dict__[POLICY_ATTR])
    return F.normalize(features, dim=-1) if normalize else features


def _encode_image(self, image, normalize: bool = False):
    features = towers.encode_image(self, image, policy=self.__dict__[POLICY_ATTR])
    return F.normalize(features, dim=-1) if normalize else features


def patch_clip(model: nn.Module, policy=None) -> nn.Module:
    """Rebind the transformer blocks the op layer computes, and ``encode_text`` / ``encode_image``
    to the tower path with the exact savings where they apply. Returns ``model``.

    ``policy``: the ``KernelPolicy`` (or backend name) of every op the patched model runs, and the
    default of a ``SkipTuner`` on it; None: the ambient policy at each call (``use_policy``).
    Patching again replaces the policy."""
    from skipkernels import _ext
    from skipkernels.checks import check_model
    from skipkernels.ops.policy import resolve
    check_model("model", model)
    _ext.load()  # the compiled ops' first use (may compile them once), before any torch.compile trace
    if policy is not None:
        resolve(policy)  # an unknown backend name fails here, not at the first op
    model_towers(model)  # TypeError / ValueError naming what is not supported, before any rebinding
    for block in fused_blocks(model):
        block.forward = types.MethodType(_patched_forward, block)
        setattr(block, POLICY_ATTR, policy)
    if model_towers(model)[1].mask_kind != "custom":  # the tower path knows causal masks and none
        model.encode_text = types.MethodType(_encode_text, model)
    if getattr(model.visual, "output_tokens", False) is False:
        model.encode_image = types.MethodType(_encode_image, model)
    setattr(model, POLICY_ATTR, policy)
    setattr(model, _PATCHED_FLAG, True)
    return model


def unpatch_clip(model: nn.Module) -> nn.Module:
    """Restore open_clip's own forwards; a block holding PET modules gets PET's forward, which
    applies them (open_clip's own would skip them). Returns ``model``."""
    from skipkernels.checks import check_model
    check_model("model", model)
    for block in fused_blocks(model):
        block.__dict__.pop("forward", None)
        block.__dict__.pop(POLICY_ATTR, None)
        if block_has_pet(block):
            block.forward = types.MethodType(clip_block_forward, block)
    for name in ("encode_text", "encode_image", _PATCHED_FLAG, POLICY_ATTR):
        model.__dict__.pop(name, None)
    return model
