"""The model families skipkernels tunes: the adapters' reports under their earlier names.

What each family keeps where lives in ``skipkernels.adapters`` (one module per ecosystem:
``open_clip``, ``timm``, ``transformers``), the only code that knows foreign model classes.
"""
from skipkernels.adapters import (HF_MODELS, PROMPT_POSITION_TEXT_POOLS, SINGLE_TOKEN_TEXT_POOLS, HFImageTower,
                                  HFTextTower, OpenClipImageTower, PaddedTokens, TextTower, TimmImageTower,
                                  UnsupportedModel, hf_image_size, image_tower, is_hf_model, model_towers,
                                  text_tower, token_function)

__all__ = ["HF_MODELS", "PROMPT_POSITION_TEXT_POOLS", "SINGLE_TOKEN_TEXT_POOLS", "HFImageTower", "HFTextTower",
           "OpenClipImageTower", "PaddedTokens", "TextTower", "TimmImageTower", "UnsupportedModel", "hf_image_size",
           "image_tower", "is_hf_model", "model_towers", "text_tower", "token_function"]
