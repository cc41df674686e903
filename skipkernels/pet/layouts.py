"""Where PET modules attach: transformer blocks and their residual sub-layers, as the adapters
report them (``skipkernels.adapters.pet_block``).

A *block* is one transformer layer; its *sub-layers* are the residual branches ``attn`` (self-
attention), ``cross`` (cross-attention, decoders) and ``mlp``. For each sub-layer a layout names
the module whose input is the residual stream X (``x_module``), the module whose output is the
branch output H (``out_module``), and for cross-attention the value projection (``value``).

Two kinds of block:
- family ``clip`` (open_clip's blocks, transformers' CLIP / SigLIP encoder layers): PET's modifiers
  own the residual adds. A block ``patch_clip`` routes through the op layer gets its PET modules
  as ``BlockHooks`` there (``pet.hooks.block_hooks``); on any other PET installs a forward
  (``pet_forward``: the adapter's forward with the modifiers, or the op layer's plan for blocks
  the adapter says run it). X and H are plain values: H is the whole branch output, LayerScale
  and post-attention norm included, and the modifier adds the residual itself.
- hook-based families (BART, T5): the host adds the residual, so the modifier rewrites H into
  s · G ⊙ (H + ΔH) with a forward hook and the host computes X + that.

Other models: ``register_layout(fn)`` with ``fn(name, module) -> Block | None``.
"""
from __future__ import annotations

import types
from typing import Callable

import torch.nn as nn

from skipkernels.adapters import pet_block
from skipkernels.adapters.base import PetBlock as Block
from skipkernels.adapters.base import SubLayer
from skipkernels.adapters.open_clip import clip_block_forward
from skipkernels.ops.block import BlockPlan

__all__ = ["Block", "SubLayer", "register_layout", "find_blocks", "layout_of", "pet_forward", "own_forward",
           "runs_pet_forward", "install_clip_forward", "install_hooked_modifier", "PetPlan"]


def _index_in_parent(name: str, parents: dict) -> int | None:
    if "." in name:
        parent_name, last = name.rsplit(".", 1)
    else:
        parent_name, last = "", name
    if isinstance(parents.get(parent_name), nn.ModuleList) and last.isdigit():
        return int(last)
    return None


_LAYOUTS: list[Callable] = [pet_block]


def register_layout(fn: Callable) -> None:
    """Add a layout: ``fn(qualified_name, module) -> Block | None`` (tried before the built-in
    ones). Its Block's sub-layers must name ``x_module``/``out_module`` (hooks are used)."""
    _LAYOUTS.insert(0, fn)


def find_blocks(model: nn.Module) -> list[Block]:
    """Every transformer block of ``model`` in module order, with its index in its ModuleList."""
    modules = dict(model.named_modules())
    blocks, inside = [], []
    for name, module in modules.items():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue  # no blocks inside blocks
        for layout in _LAYOUTS:
            block = layout(name, module)
            if block is not None:
                index = _index_in_parent(name, modules)
                block.index = 0 if index is None else index
                blocks.append(block)
                inside.append(name)
                break
    return blocks


def layout_of(module: nn.Module) -> Block | None:
    """``module``'s PET layout, if it is a block some layout knows."""
    for layout in _LAYOUTS:
        block = layout("", module)
        if block is not None:
            return block
    return None


def attaches_in_forward(module: nn.Module) -> bool:
    """Whether PET's modules attach to ``module`` as a block whose forward applies them."""
    block = layout_of(module)
    return block is not None and block.owns_forward


def own_forward(block):
    """The forward a block runs when the op layer cannot apply its PET modules: the one its
    adapter reports (which applies them), else the block class's own."""
    layout = layout_of(block)
    if layout is not None and layout.forward is not None:
        return layout.forward
    return types.MethodType(type(block).forward, block)


def runs_pet_forward(block: nn.Module) -> bool:
    """Whether ``block``'s instance forward is one ``pet_forward`` gave it."""
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is clip_block_forward or isinstance(getattr(forward, "__self__", None),
                                                                                  PetPlan)


def pet_forward(block: nn.Module):
    """The forward under which a block that ``patch_clip`` does not route applies its PET modules:
    the adapter's forward with the modifiers owning the adds, or, for blocks whose adapter says
    PET runs the op layer's plan, that plan with the modules it holds now as hooks
    (``block_hooks``)."""
    layout = layout_of(block)
    if layout is not None and layout.runs_plan:
        from skipkernels.pet.hooks import block_hooks
        hooks = block_hooks(block)
        return PetPlan(block, None, hooks, own_forward(block) if hooks is None else None).as_forward()
    return own_forward(block)


class PetPlan(BlockPlan):
    """A transformers layer's plan that PET installed (not ``patch_clip``), so ``remove`` takes it out."""


def install_clip_forward(block: nn.Module):
    """Route ``block`` through ``clip_block_forward`` (a transformers encoder layer: through the op
    layer's plan with its PET modules as hooks, so call it once they are all in); returns an undo callable that restores whatever
    forward the instance had, unless another forward was bound over it since."""
    had = "forward" in block.__dict__
    previous = block.__dict__.get("forward")
    installed = pet_forward(block)
    block.forward = installed

    def undo():
        if block.__dict__.get("forward") is not installed:
            return  # replaced since (e.g. patch_clip routed the block through the op layer): keep that
        if had:
            block.forward = previous
        else:
            block.__dict__.pop("forward", None)
    return undo


# ------------------------------------------------------------------ hook-based sub-layer modifiers

def install_hooked_modifier(sub: SubLayer, modifier: nn.Module, needs_x: bool):
    """Attach ``modifier`` to a hook-based sub-layer: X is taken from ``x_module``'s input, H is
    ``out_module``'s output, replaced by the modifier's branch s · G ⊙ (H + ΔH). Returns undo."""
    handles = []
    if needs_x:
        def stash_x(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            modifier._pet_x = x

        handles.append(sub.x_module.register_forward_pre_hook(stash_x, with_kwargs=True))

    def rewrite(module, args, output):
        x = None
        if needs_x:
            x = modifier.__dict__.pop("_pet_x", None)
            if x is None:
                raise RuntimeError("PET sub-layer output seen without its input: the layout's "
                                   "x_module did not run before out_module")
        return modifier(None, output, gate_input=x)

    handles.append(sub.out_module.register_forward_hook(rewrite))

    def undo():
        for handle in handles:
            handle.remove()
        modifier.__dict__.pop("_pet_x", None)
    return undo
