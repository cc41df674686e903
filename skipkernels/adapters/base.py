"""What an adapter reports about a model, whatever ecosystem built it.

An adapter (one module per ecosystem: ``open_clip``, ``timm``, ``transformers``) is the only code
that knows foreign model classes. For a model it reports:
- its towers (``model_towers``): each tower's blocks, stem, pooling and head, its mask, and why each
  exact saving does not apply (``pruning_off_reason``, ``truncation_off_reason``);
- each block's parts by role (``read_block`` -> ``skipkernels.ops.block.BlockParts``), or why the
  op layer cannot compute it;
- where PET modules attach (``pet_block`` -> ``PetBlock``): the residual sub-layers, the modules
  holding X and H for hook-based families, and the projections the op layer reads as weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

# Pooling rules that read one token per prompt / image: last-block pruning is exact for them.
SINGLE_TOKEN_TEXT_POOLS = ("argmax", "eos", "first", "last")
# Text pooling at a position that depends on the prompt (not on the context length): truncation
# to the longest prompt is exact for them under a causal mask.
PROMPT_POSITION_TEXT_POOLS = ("argmax", "eos", "first")


class UnsupportedModel(TypeError):
    pass


def is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def gelu_name(module) -> str | None:
    """The op-layer name of PyTorch's own GELU module, or None."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    return None


def mlp_activation_name(module) -> str | None:
    """The op layer's name of the MLP activation of an open_clip or timm block (open_clip's
    QuickGELU or PyTorch's GELU), or None: it runs as a module."""
    if type(module).__name__ == "QuickGELU":
        return "quick_gelu"
    return gelu_name(module)


def causal_mask_kwargs(x, causal: bool, name: str = "attn_mask") -> dict:
    """The additive causal mask of a block run as a module, under the keyword ``name``."""
    if not causal:
        return {}
    length = x.shape[1]
    return {name: torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)}


def mask_kind(mask) -> str:
    """'none', 'causal' or 'custom' (the comparison is a device sync on a GPU: plans ask once)."""
    if mask is None:
        return "none"
    causal = torch.full(mask.shape, float("-inf"), device=mask.device, dtype=mask.dtype).triu_(1)
    return "causal" if mask.dim() == 2 and torch.equal(mask, causal) else "custom"


def hybrid_message(what: str) -> str:
    return (f"the image tower is {what}, a hybrid convolution + attention network (e.g. MobileCLIP): its "
            "stages are not one stack of transformer blocks over a fixed token sequence, so LSkip has no block "
            "omega whose input tokens it could cache exactly")


# ----------------------------------------------------------------------------- PET attach points
@dataclass
class SubLayer:
    kind: str                            # "attn", "cross" or "mlp"
    out_module: nn.Module | None = None  # its output is H (hook-based families)
    x_module: nn.Module | None = None    # its first input is X (hook-based families)
    value: nn.Linear | None = None       # cross-attention value projection


@dataclass
class PetBlock:
    """Where PET modules attach in one transformer block.

    family: "clip" where PET's modifiers own the residual adds in the block's forward (``forward``,
        or the op layer's plan where ``runs_plan``), or the name of a hook-based family.
    weight_read: the Linear projections whose weights the op layer reads as tensors (LoRA on them
        is weight-level: W + ΔW).
    """
    name: str
    module: nn.Module
    index: int
    family: str
    width: int
    is_decoder: bool
    token_dim: int = 1
    sublayers: dict = field(default_factory=dict)
    forward: Callable | None = None      # the block's forward with PET modifiers owning the adds
    runs_plan: bool = False              # PET runs the op layer's plan (its modules as hooks)
    weight_read: tuple = ()

    @property
    def owns_forward(self) -> bool:
        return self.family == "clip"
