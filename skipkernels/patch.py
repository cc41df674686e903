"""patch_clip / unpatch_clip: route a model's transformer blocks through the op layer.

Supported families: ``skipkernels.adapters`` (open_clip CLIP and CustomTextCLIP with an open_clip
or timm ViT / Eva image tower and open_clip's text transformer; transformers' CLIP, SigLIP and
SigLIP 2). Only ``forward`` is rebound, as an instance attribute of each block the op layer
computes (the others, e.g. Eva blocks, keep their own), to its ``BlockPlan`` in the model's one
``ModelPlan``, which the model holds and which ``encode_image`` / ``encode_text`` are rebound to.
Parameters, their names, buffers and the state_dict stay exactly as the model's library made them,
so checkpoints load either way.
"""
from __future__ import annotations

import torch.nn as nn

from skipkernels.families import is_hf_model, model_towers
from skipkernels.ops.block import held_plan, routed_plan, unsupported_reason
from skipkernels.pet import has_pet
from skipkernels.pet.layouts import pet_forward
from skipkernels.skip.towers import ModelPlan, hold_plan


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
    # The model's one plan, built (or built again: the model may have changed since) under
    # ``policy``; the blocks route through it. Finding the towers raises the TypeError or
    # ValueError naming what is not supported, before any rebinding.
    plan = hold_plan(model, policy)
    plan.route_blocks()
    # A transformers model keeps its own encoders (get_image_features / get_text_features return its
    # output types); its layers run their plans. The tower path knows causal text masks and none.
    if not is_hf_model(model):
        if plan.text_mask != "custom":
            model.encode_text = plan.encode_text
        if getattr(getattr(model, "visual", None), "output_tokens", False) is False:
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
            block.forward = pet_forward(block)
    for name in ("encode_text", "encode_image"):
        if isinstance(getattr(model.__dict__.get(name), "__self__", None), ModelPlan):
            model.__dict__.pop(name)
    plan = held_plan(model)
    if plan is not None:
        plan.routes_blocks = False  # the plan stays the model's (a tuner may run it); it routes nothing
    return model
