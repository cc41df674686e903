"""Where PET modules attach: transformer blocks and their residual sub-layers, per model family.

A *block* is one transformer layer; its *sub-layers* are the residual branches ``attn`` (self-
attention), ``cross`` (cross-attention, decoders) and ``mlp``. For each sub-layer a layout names
the module whose input is the residual stream X (``x_module``), the module whose output is the
branch output H (``out_module``), and for cross-attention the value projection (``value``).

Families:
- ``clip``: open_clip ``ResidualAttentionBlock`` (nn.MultiheadAttention) and
  ``CustomResidualAttentionBlock`` (open_clip ``Attention``), and transformers' CLIP / SigLIP /
  SigLIP 2 encoder layers, which always run the op layer's plan under PET. A block ``patch_clip`` routes
  through the op layer gets its PET modules as ``BlockHooks`` there (``pet.hooks.block_hooks``);
  on any other, PET owns the forward (``clip_block_forward``). Either way X and H are plain
  values: H is the whole branch output ``ls_1(attn(ln_1(X)))`` (``ls_1(ln_attn(attn(ln_1(X))))`` for the custom block), i.e. including
  LayerScale and the post-attention norm, and the modifier adds the residual itself.
- ``bart``: Hugging Face BART layers (post-norm). attn: X = the q-projection's input (the layer
  input), H = ``out_proj``'s output; mlp: X = ``fc1``'s input, H = ``fc2``'s output; cross: X =
  ``encoder_attn.q_proj``'s input, H = ``encoder_attn.out_proj``'s, value ``encoder_attn.v_proj``.
- ``t5``: Hugging Face T5 blocks (pre-norm). X = the input of ``T5LayerSelfAttention`` /
  ``T5LayerCrossAttention`` / ``T5LayerFF`` (the residual stream before their norm), H = the
  output of ``o`` / ``o`` / ``DenseReluDense.wo``; value ``EncDecAttention.v``.
In the Hugging Face layers the host adds the residual (after its dropout), so the modifier
rewrites H into s · G ⊙ (H + ΔH) with a forward hook and the host computes X + that.

Other models: ``register_layout(fn)`` with ``fn(name, module) -> Block | None``.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from skipkernels.ops.block import HF_LAYERS, NO_HOOKS, BlockPlan

CLIP_BLOCKS = ("ResidualAttentionBlock", "CustomResidualAttentionBlock")
# The blocks whose modifiers PET's own forward (or the op layer's route: transformers' CLIP /
# SigLIP encoder layers, HF_LAYERS) applies: every other
# block gets them through forward hooks.
FORWARD_BLOCKS = CLIP_BLOCKS + HF_LAYERS
# Post-norm BART-style layers: the FFN's residual is fc1's input. Pre-norm relatives (mBART,
# Whisper, ...) keep the residual before their final norm and need a layout of their own.
BART_LAYERS = ("BartEncoderLayer", "BartDecoderLayer")


@dataclass
class SubLayer:
    kind: str                            # "attn", "cross" or "mlp"
    out_module: nn.Module | None = None  # its output is H (hook-based families)
    x_module: nn.Module | None = None    # its first input is X (hook-based families)
    value: nn.Linear | None = None       # cross-attention value projection


@dataclass
class Block:
    name: str
    module: nn.Module
    index: int
    family: str          # "clip" (PET owns the forward) or a hook-based family
    width: int
    is_decoder: bool
    token_dim: int = 1
    sublayers: dict = field(default_factory=dict)

    @property
    def owns_forward(self) -> bool:
        return self.family == "clip"


def _index_in_parent(name: str, parents: dict) -> int | None:
    if "." in name:
        parent_name, last = name.rsplit(".", 1)
    else:
        parent_name, last = "", name
    if isinstance(parents.get(parent_name), nn.ModuleList) and last.isdigit():
        return int(last)
    return None


def _clip_block(name, module):
    if type(module).__name__ not in CLIP_BLOCKS:
        return None
    attn = module.attn
    token_dim = 1 if getattr(attn, "batch_first", True) else 0
    width = module.mlp.c_fc.in_features
    return Block(name, module, -1, "clip", width, is_decoder=hasattr(module, "ln_1_kv"),
                 token_dim=token_dim,
                 sublayers={"attn": SubLayer("attn"), "mlp": SubLayer("mlp")})


def _hf_encoder_layer(name, module):
    if type(module).__name__ not in HF_LAYERS or not type(module).__module__.startswith("transformers."):
        return None
    return Block(name, module, -1, "clip", module.mlp.fc1.in_features, is_decoder=False,
                 sublayers={"attn": SubLayer("attn"), "mlp": SubLayer("mlp")})


def _bart_layer(name, module):
    if type(module).__name__ not in BART_LAYERS:
        return None
    subs = {"attn": SubLayer("attn", module.self_attn.out_proj, module.self_attn.q_proj),
            "mlp": SubLayer("mlp", module.fc2, module.fc1)}
    cross = getattr(module, "encoder_attn", None)
    if cross is not None:
        subs["cross"] = SubLayer("cross", cross.out_proj, cross.q_proj, cross.v_proj)
    return Block(name, module, -1, "bart", module.fc1.in_features, is_decoder=cross is not None,
                 sublayers=subs)


def _t5_block(name, module):
    layers = getattr(module, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        return None
    first, last = layers[0], layers[-1]
    if not hasattr(first, "SelfAttention") or not hasattr(last, "DenseReluDense"):
        return None
    wo = last.DenseReluDense.wo
    subs = {"attn": SubLayer("attn", first.SelfAttention.o, first),
            "mlp": SubLayer("mlp", wo, last)}
    is_decoder = len(layers) == 3 and hasattr(layers[1], "EncDecAttention")
    if is_decoder:
        cross = layers[1]
        subs["cross"] = SubLayer("cross", cross.EncDecAttention.o, cross, cross.EncDecAttention.v)
    return Block(name, module, -1, "t5", wo.out_features, is_decoder=is_decoder, sublayers=subs)


_LAYOUTS: list[Callable] = [_clip_block, _hf_encoder_layer, _bart_layer, _t5_block]


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


# --------------------------------------------------------------- open_clip block forward under PET

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
    if type(self).__name__ == "ResidualAttentionBlock":
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


def own_forward(block):
    """The forward a block runs when the op layer cannot apply its PET modules: PET's for
    open_clip blocks (``clip_block_forward``, which applies them), else the block class's own."""
    if type(block).__name__ in CLIP_BLOCKS:
        return types.MethodType(clip_block_forward, block)
    return types.MethodType(type(block).forward, block)


def runs_pet_forward(block: nn.Module) -> bool:
    """Whether ``block``'s instance forward is one ``pet_forward`` gave it."""
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is clip_block_forward or isinstance(getattr(forward, "__self__", None),
                                                                                  PetPlan)


def pet_forward(block: nn.Module, hooks=None):
    """The forward under which a block that ``patch_clip`` does not route applies its PET modules:
    ``clip_block_forward`` for open_clip blocks; for a transformers encoder layer the op layer's
    plan with the modules as ``hooks`` (None: none yet, given by ``set_hooks`` once they are in)."""
    if type(block).__name__ in HF_LAYERS:
        return PetPlan(block, None, hooks if hooks is not None else NO_HOOKS).as_forward()
    return types.MethodType(clip_block_forward, block)


class PetPlan(BlockPlan):
    """A transformers layer's plan that PET installed (not ``patch_clip``), so ``remove`` takes it out."""


def install_clip_forward(block: nn.Module):
    """Route ``block`` through ``clip_block_forward`` (a transformers encoder layer: through the op
    layer's plan, which applies the modules as hooks; ``set_hooks`` gives it them once they are
    in); returns an undo callable that restores whatever forward the instance had, unless another
    forward was bound over it since."""
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
