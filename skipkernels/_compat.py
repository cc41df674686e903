"""Import helpers: torchvision beside a CPU-only torch, and optional packages (``import_optional``:
a missing one is an ImportError that names the extra installing it).

The PyPI torchvision wheel is a CUDA build; with a CPU torch its ``_C`` fails to register
``torchvision::nms`` and ``import torchvision`` raises. open_clip imports torchvision
unconditionally, but only needs its pure-Python transforms. We define the two missing op
schemas only when that exact error happens, so a normal install is untouched.
"""
from __future__ import annotations

import sys

import torch

_torchvision_schema_lib = None  # kept alive: the schemas live as long as this object


def _drop_half_imported(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def import_torchvision():
    global _torchvision_schema_lib
    try:
        import torchvision  # noqa: F401
        return torchvision
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    _drop_half_imported("torchvision")
    _torchvision_schema_lib = torch.library.Library("torchvision", "DEF")
    _torchvision_schema_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_schema_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    return torchvision


def import_open_clip():
    import_torchvision()
    import open_clip
    return open_clip


# The optional packages and the extra (pyproject.toml) that installs each.
EXTRAS = {"transformers": "hf", "matplotlib": "plots", "tensorboard": "tensorboard", "onnx": "export",
          "onnxscript": "export", "onnxruntime": "export", "triton": "triton"}


def install_hint(package: str) -> str:
    """How to install an optional package: ``pip install 'skipkernels[hf]'`` (or the package alone)."""
    extra = EXTRAS.get(package)
    return f"pip install 'skipkernels[{extra}]' (or pip install {package})" if extra else f"pip install {package}"


def import_optional(module: str, needed_for: str):
    """``module`` (e.g. ``transformers``), or ``errors.MissingDependency`` naming its package, the
    extra that installs it and what needed it (``needed_for``, e.g. "model hf:openai/clip-vit-base-patch16")."""
    import importlib

    from skipkernels.errors import MissingDependency
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingDependency(f"{needed_for} needs the {package} package, which is not installed ({err}): "
                              f"{install_hint(package)}") from err
