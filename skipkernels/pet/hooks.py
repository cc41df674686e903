"""How the op layer applies a block's PET modules: ``block_hooks``, from the parts the block's
adapter reports. The only part of ``pet`` that the op layer's users (``skip``, ``patch``) import
besides the config."""
from __future__ import annotations

import functools

import torch.nn as nn

from skipkernels import adapters  # noqa: F401 - registers the adapters' block readers with the op layer
from skipkernels.ops.block import BlockHooks, BlockParts, read_block
from skipkernels.pet import modules as M


def has_pet(module: nn.Module) -> bool:
    """Whether ``module`` (a block, or a whole model) holds PET modules. The op layer's
    ``BlockPlan`` applies them only as the hooks ``block_hooks`` builds."""
    return any(name.rsplit(".", 1)[-1].startswith(("pet_", "lora"))
               for name, _ in module.named_modules() if name)


def _sublayer_hook(modifier: nn.Module):
    """A ``BlockHooks`` sub-layer hook: the modifier owns the residual add; the VL-PET gate runs
    as the op the block plan bound (under the route's policy) unless the modifier has its own."""
    if isinstance(modifier, M.VLPETModifier):
        return modifier.update
    return functools.partial(_adapter_update, modifier)


def _adapter_update(modifier, x, h, gate_op):
    return modifier(x, h)


def block_hooks(block: nn.Module, parts: BlockParts | None = None):
    """The ``skipkernels.ops.block.BlockHooks`` that apply ``block``'s PET modules on the op
    layer's route (``NO_HOOKS`` for a block without any), or None where the block runs its own
    forward: the op layer does not compute it or it holds a module that route would not apply.
    ``parts``: the block's parts as its adapter reported them (read here when not given). Walks
    the block's modules: plans call it once, when they are built."""
    if parts is None:
        parts = read_block(block)
        if not isinstance(parts, BlockParts):
            return None
    lora = {}
    # LoRA on a projection the plan calls as a module hangs as its "lora" child; one on a weight
    # the plan reads as a tensor (e.g. nn.MultiheadAttention's out_proj) is weight-level and
    # reads W + ΔW itself, so it needs no hook.
    for role, linear in (("out", parts.out), ("fc1", parts.fc1), ("fc2", parts.fc2)):
        factors = linear._modules.get("lora")
        if factors is not None:
            lora[role] = factors
    known = {id(m) for m in lora.values()}
    modifiers = {kind: block._modules.get(f"pet_{kind}") for kind in ("attn", "mlp")}
    known |= {id(m) for m in modifiers.values() if m is not None}
    for name, module in block.named_modules():
        last = name.rsplit(".", 1)[-1]
        if not name or not last.startswith(("pet_", "lora")) or id(module) in known:
            continue
        if last.startswith("lora_"):
            continue  # weight-level LoRA: the block reads W + ΔW through the weight itself
        return None  # a module the op layer would not apply: the block runs its own forward
    row_wise = all(getattr(m, "granularity", None) != "small" for m in modifiers.values() if m is not None)
    return BlockHooks(attn=_sublayer_hook(modifiers["attn"]) if modifiers["attn"] is not None else None,
                      mlp=_sublayer_hook(modifiers["mlp"]) if modifiers["mlp"] is not None else None,
                      lora=lora, row_wise=row_wise)
