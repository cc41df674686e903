"""Import helpers for environments with a CPU-only torch.

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
