"""Triton kernels, one module per kernel family: ``layer_norm``, ``linear``, ``attention``.

The op layer (``skipkernels.ops``) imports those modules lazily, so importing ``skipkernels`` never
needs triton. This file holds only torch-level helpers shared by the kernel wrappers and must stay
free of triton imports.

On a machine without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set before
the kernel modules are imported). There they take big tiles and compute every dot in fp32 (the
interpreter pays per operation, and its half-precision dots are unreliable).

``launch_settings(...)`` scopes the test and debug aids: ``poison=True`` makes every wrapper
allocate its outputs filled with NaN, so a tile a kernel forgets to write shows up in tests
instead of holding stale memory; ``gpu_path=True`` makes the interpreter run the tiles and dot
dtypes a GPU runs (``interpreter_gemm_tile``: the GEMMs' tile there, as gemm_tiles would pick one).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    poison: bool = False
    gpu_path: bool = False
    interpreter_gemm_tile: dict | None = None

# The one list of activation names, for the kernels' fused epilogues and the op layer's references
# (skipkernels.ops.linear imports it). A name's index here is its ACT code inside the kernels.
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu")


def activation_code(activation: str) -> int:
    """The kernels' ACT code of an activation name; ValueError for a name not in ``ACTIVATIONS``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return ACTIVATIONS.index(activation)


_settings = LaunchSettings()


@contextlib.contextmanager
def launch_settings(**changes):
    """Kernel launches inside use these LaunchSettings fields (see the module docstring); the
    previous settings come back on exit."""
    global _settings
    previous, _settings = _settings, dataclasses.replace(_settings, **changes)
    try:
        yield _settings
    finally:
        _settings = previous


def current_launch_settings() -> LaunchSettings:
    return _settings


def poison_enabled() -> bool:
    return _settings.poison


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_shortcuts() -> bool:
    """Big tiles and fp32 dots: under the interpreter, unless ``launch_settings(gpu_path=True)``."""
    return interpreting() and not _settings.gpu_path


def new_empty(shape, dtype, device) -> torch.Tensor:
    if _settings.poison and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype a kernel should write for a result of ``dtype``.

    The interpreter's fp32 -> bf16 conversion does not round to nearest, so under it bf16 results
    are written in fp32 and rounded by torch afterwards; compiled kernels write bf16 directly.
    """
    if dtype == torch.bfloat16 and interpreting():
        return torch.float32
    return dtype


def autocast_inputs(*tensors):
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    Autocast does not see custom kernels; this applies the cast ``F.linear`` / SDPA would get, so
    a Triton op under ``torch.autocast`` computes in the same dtype as the reference. The cast is
    an ordinary differentiable ``.to``, so gradients reach fp32 parameters in fp32.
    """
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def check_tensors(*tensors) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpreting():
            raise RuntimeError("skipkernels.triton kernels need CUDA tensors; for CPU tensors set "
                               "TRITON_INTERPRET=1 before importing skipkernels.triton modules")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for fp32 ``tl.dot``: TF32 only where torch itself allows it for matmuls,
    so a kernel is never less precise than the reference's GEMM. Reads torch's newer
    ``fp32_precision`` setting first: after it is used, reading ``allow_tf32`` raises."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting not in (None, "none"):
        return "tf32" if setting == "tf32" else "ieee"
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:
        return "ieee"
