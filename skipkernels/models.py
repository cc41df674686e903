"""Creating open_clip models: built-in names, the embedded tiny config, local or named weights."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from skipkernels._compat import import_open_clip
from skipkernels.train.checkpoint import CheckpointError

TINY_MODEL = "skipkernels-tiny"  # small random-weight ViT config for CPU runs and tests
_registered = False


def open_clip_module():
    global _registered
    open_clip = import_open_clip()
    if not _registered:
        open_clip.add_model_config(Path(__file__).parent / "configs")
        _registered = True
    return open_clip


def create_model(name: str, pretrained: str | None = None, device="cpu", seed: int | None = 0, **kwargs):
    """Returns (model, tokenizer). ``pretrained``: a local checkpoint path, an open_clip weight
    name (e.g. 'openai'; needs those weights to be reachable or cached), or None for random
    weights drawn with ``seed``."""
    open_clip = open_clip_module()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() "
                         f"(the embedded small config is {TINY_MODEL!r})")
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained}")
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device=device, **kwargs)
    except RuntimeError as err:
        if pretrained and not os.path.isfile(pretrained):
            raise CheckpointError(f"could not load weights {pretrained!r} for {name}: {err}. Without network "
                                  "access pass a local checkpoint path") from err
        if pretrained and "state_dict" in str(err):  # weights of another model (or not a model at all)
            raise CheckpointError(f"{pretrained} does not hold weights of {name}: "
                                  f"{str(err).splitlines()[-1].strip()[:300]}") from err
        raise
    return model, open_clip.get_tokenizer(name)
