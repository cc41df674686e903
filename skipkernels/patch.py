"""patch_clip / unpatch_clip: route an open_clip model's transformer blocks through the op layer.

Supported families: ``skipkernels.families`` (CLIP and CustomTextCLIP with an open_clip or timm
ViT / Eva image tower and open_clip's text transformer). Only ``forward`` is rebound, as an
instance attribute of each block the op layer computes (the others, e.g. Eva blocks, keep their
own), to its ``BlockPlan``; ``encode_image`` / ``encode_text`` are rebound to the model's
``ModelPlan``. Parameters, their names, buffers and the state_dict stay exactly as open_clip made
them, so checkpoints load either way.
"""
from __future__ import annotations

import torch.nn as nn

from skipkernels.families import is_hf_model, model_towers
from skipkernels.ops.block import BlockPlan, routed_plan, unsupported_reason
from skipkernels.pet import has_pet
from skipkernels.pet.hooks import block_hooks
from skipkernels.pet.layouts import own_forward, pet_forward
from skipkernels.skip.towers import ModelPlan


def fused_blocks(model: nn.Module) -> list:
    """Validate that ``model`` is a supported open_clip model (a clear error otherwise); return the
    blocks of both towers that the op layer computes."""
    return _computed(*model_towers(model))


def _computed(image, text) -> list:
    return [b for b in list(image.blocks) + list(text.blocks) if unsupported_reason(b) is None]


def patch_clip(model: nn.Module, policy=None) -> nn.Module:
    """Route the transformer blocks the op layer computes through their plans, and
    ``encode_text`` / ``encode_image`` through the model's tower plan, with the exact savings
    where they apply. Returns ``model``.

    ``policy``: the ``KernelPolicy`` (or backend name) of every op the patched model runs, and the
    default of a ``SkipTuner`` on it; None: the ambient policy at each call (``use_policy``).
    Patching again builds the plans again, under the new policy."""
    from skipkernels import _ext
    from skipkernels.checks import check_model
    from skipkernels.ops.policy import resolve
    check_model("model", model)
    _ext.load()  # the compiled ops' first use (may compile them once), before any torch.compile trace
    if policy is not None:
        resolve(policy)  # an unknown backend name fails here, not at the first op
    image, text = model_towers(model)  # TypeError / ValueError naming what is not supported, before any rebinding
    for block in _computed(image, text):
        hooks = block_hooks(block)
        block.forward = BlockPlan(block, policy, hooks, own_forward(block) if hooks is None else None).as_forward()
    text_mask = text.mask_kind
    # A transformers model keeps its own encoders (get_image_features / get_text_features return its
    # output types); its layers run their plans.
    plan = ModelPlan(model, policy) if text_mask != "custom" and not is_hf_model(model) else None
    if plan is not None:  # the tower path knows causal masks and none
        model.encode_text = plan.encode_text
    if plan is not None and getattr(getattr(model, "visual", None), "output_tokens", False) is False:
        model.encode_image = plan.encode_image
    return model


def unpatch_clip(model: nn.Module) -> nn.Module:
    """Restore open_clip's own forwards; a block holding PET modules gets PET's forward, which
    applies them (open_clip's own would skip them). Returns ``model``."""
    from skipkernels.checks import check_model
    check_model("model", model)
    for block in fused_blocks(model):
        if routed_plan(block) is not None:
            block.__dict__.pop("forward")
        if has_pet(block) and "forward" not in block.__dict__:
            block.forward = pet_forward(block, block_hooks(block))
    for name in ("encode_text", "encode_image"):
        if isinstance(getattr(model.__dict__.get(name), "__self__", None), ModelPlan):
            model.__dict__.pop(name)
    return model
