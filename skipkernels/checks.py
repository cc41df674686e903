"""Argument checks of the public Python API (patch_clip, SkipTuner and its methods, predict,
load_classifier, apply_pet, finetune).

Each check raises TypeError (wrong kind of object or dtype) or ValueError (right kind, wrong
value or shape) with a message that names the argument, what it got and what it needs, so a bad
input never ends in an error from deep inside torch. They read only metadata (type, shape,
dtype), never tensor values: nothing here synchronises with a device, so they also run on the
``static=True`` (CUDA-graph) path. The label range check, which reads values, lives in
``ops.class_select.check_label_range`` and stays off that path.
"""
from __future__ import annotations

import os
import torch


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {str(value.dtype).removeprefix('torch.')}"
    return f"{type(value).__name__} {value!r}"[:200]


def check_classnames(name: str, classnames) -> list[str]:
    """A list (or other sequence) of non-empty strings, not one string."""
    if isinstance(classnames, (str, bytes)):
        raise TypeError(f"{name} must be a list of class names, got the single string {classnames!r} (it would "
                        f"be one class per character): pass [{classnames!r}] or a list")
    if isinstance(classnames, torch.Tensor) or not hasattr(classnames, "__iter__"):
        raise TypeError(f"{name} must be a list of class names (strings), got {_kind(classnames)}")
    names = list(classnames)
    bad = next((c for c in names if not isinstance(c, str)), None)
    if bad is not None:
        raise TypeError(f"{name} must hold strings, got {_kind(bad)} among them")
    return names


def check_positive(name: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {_kind(value)}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def image_size(model) -> tuple[int, int]:
    """The (height, width) the model's image tower takes."""
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if vision_config is not None and not hasattr(model, "visual"):  # a Hugging Face model
        from skipkernels.families import hf_image_size
        size = hf_image_size(vision_config)
        return int(size), int(size)
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", None))
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def token_width(model) -> int:
    """The width of the image tower's residual stream (what a cached prefix's last dim holds)."""
    from skipkernels.families import image_tower
    block = image_tower(model).blocks[0]
    return next(int(m.normalized_shape[-1]) for m in block.modules() if hasattr(m, "normalized_shape"))


def check_images(name: str, images, model, hint: str = "") -> None:
    """A float tensor (B >= 1, 3, H, W) at the model's image size, on the model's device type."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of images (batch, 3, height, width), got {_kind(images)}{hint}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point (normalised pixels, as open_clip's preprocess gives), got "
                        f"dtype {str(images.dtype).removeprefix('torch.')}: convert with preprocess, or "
                        f"images.float() / 255 then normalise")
    if images.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, 3, height, width), got shape {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(images.shape)}): give at least one image")
    if images.shape[1] != 3:
        raise ValueError(f"{name} must have 3 channels (RGB), got {images.shape[1]} (shape {tuple(images.shape)}); "
                         "for grey images repeat the channel: images.expand(-1, 3, -1, -1)")
    want = image_size(model)
    if tuple(images.shape[2:]) != want:
        raise ValueError(f"{name} must be {want[0]}x{want[1]} for this model, got {images.shape[2]}x{images.shape[3]} "
                         "(resize them, e.g. with open_clip's preprocess)")
    _check_device(name, images, next(model.parameters()).device)


def check_prefix(name: str, tokens, width: int, device: torch.device) -> None:
    """The cached prefix ``image_prefix`` returns: a float tensor (B >= 1, tokens, width) on the
    model's device type; the caller knows ``width`` (``token_width``) and ``device``."""
    hint = (f"; in this mode loss takes the cached prefix (batch, tokens, {width}): call tuner.image_prefix(images) "
            "first and pass its result")
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a tensor{hint}, got {_kind(tokens)}")
    if tokens.dim() == 4:
        raise ValueError(f"{name} looks like raw images (shape {tuple(tokens.shape)}){hint}")
    if tokens.dim() != 3 or tokens.shape[-1] != width:
        raise ValueError(f"{name} must have shape (batch, tokens, {width}), got {tuple(tokens.shape)}{hint}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype {str(tokens.dtype).removeprefix('torch.')}{hint}")
    if tokens.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(tokens.shape)}): give at least one image")
    _check_device(name, tokens, device)


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device.type != device.type:
        raise ValueError(f"{name} is on {tensor.device}, the model on {device}: move it with .to({str(device)!r})")


def check_labels(name: str, labels, batch: int) -> None:
    """An int64/int32 tensor (batch,) of class indices (the range is checked separately)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of class indices, got {_kind(labels)}: use "
                        f"torch.tensor({name}) or torch.as_tensor({name})")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer class indices, got dtype {str(labels.dtype).removeprefix('torch.')}"
                        f": use {name}.long() if they are whole numbers")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), one class index per image, got {tuple(labels.shape)}")


def check_tokenizer(tokenizer) -> None:
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be callable (texts -> token ids), e.g. open_clip.get_tokenizer(name), got "
                        f"{_kind(tokenizer)}")


def check_model(name: str, model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be an open_clip CLIP model (an nn.Module), got {_kind(model)}")


def check_device(name: str, device) -> torch.device:
    """A torch.device from ``device`` (a name such as "cpu", "cuda:0", or a torch.device)."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"{name} must be a torch.device or a name such as 'cpu' or 'cuda', got {_kind(device)}")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name} {device!r} is not a device: expected 'cpu', 'cuda' or 'cuda:N'") from None


def check_path(name: str, path) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {_kind(path)}")
