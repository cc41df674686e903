"""Adapters: the one place that knows foreign model classes, one module per ecosystem.

- ``open_clip``: CLIP / CustomTextCLIP, their ViT image tower, text transformer and blocks;
- ``timm``: ViT / Eva trunks inside open_clip's TimmModel, and timm's ViT block;
- ``transformers``: CLIPModel / SiglipModel / Siglip2Model, their encoder layers and tokenizers,
  and the BART / T5 layers PET applies to.

For a model they report its towers (``model_towers``: blocks, stem, pooling, head, mask, and why
each exact saving is off), each block's parts by role (``read_block``, registered with the op
layer, which computes any block from its parts: ``skipkernels.ops.block.read_block``), and where
PET modules attach (``pet_block``).
The rest of the package reads these reports and names no foreign class; adding a model family
touches one adapter and its tests.
"""
from __future__ import annotations

from skipkernels.adapters import open_clip, timm, transformers
from skipkernels.adapters.base import (PROMPT_POSITION_TEXT_POOLS, SINGLE_TOKEN_TEXT_POOLS, PetBlock, SubLayer,
                                       UnsupportedModel)
from skipkernels.adapters.open_clip import OpenClipImageTower, TextTower, clip_block_forward
from skipkernels.adapters.timm import TimmImageTower
from skipkernels.adapters.transformers import (HFImageTower, HFTextTower, PaddedTokens, hf_image_size,
                                               token_function)
from skipkernels.ops.block import register_block_reader

HF_MODELS = transformers.MODELS
ADAPTERS = (open_clip, timm, transformers)

for _adapter in ADAPTERS:
    register_block_reader(_adapter.read_block)


def is_hf_model(model) -> bool:
    """A Hugging Face transformers model (its own config, ``save_pretrained``)."""
    return transformers.is_transformers(model)


def model_towers(model):
    """(image tower, text tower) of a supported open_clip or Hugging Face model; a clear error otherwise."""
    if is_hf_model(model):
        return transformers.model_towers(model)
    return open_clip.model_towers(model)


def image_tower(model):
    if is_hf_model(model):
        return transformers.model_towers(model)[0]
    return open_clip.image_tower(model)


def text_tower(model):
    if is_hf_model(model):
        return transformers.model_towers(model)[1]
    return open_clip.text_tower(model)


def pet_block(name, module) -> PetBlock | None:
    """Where PET modules attach in ``module``, if it is a transformer block an adapter knows."""
    for adapter in (open_clip, transformers):
        found = adapter.pet_block(name, module)
        if found is not None:
            return found
    return None


def is_paper_model(model) -> bool:
    """An open_clip CLIP with its own ViT image tower (what the paper-style step runs)."""
    return open_clip.is_paper_model(model)


__all__ = ["ADAPTERS", "HF_MODELS", "PROMPT_POSITION_TEXT_POOLS", "SINGLE_TOKEN_TEXT_POOLS", "HFImageTower",
           "HFTextTower", "OpenClipImageTower", "PaddedTokens", "PetBlock", "SubLayer", "TextTower", "TimmImageTower",
           "UnsupportedModel", "clip_block_forward", "hf_image_size", "image_tower", "is_hf_model",
           "is_paper_model", "model_towers", "pet_block", "text_tower", "token_function"]
