"""The VL-PET gated update: ``out = x + s * g ⊙ (h + delta_h)``.

``x`` is a sub-layer's input (the residual stream), ``h`` its output, ``delta_h`` an adapter's
modification of it, ``g`` the granularity-controlled gate and ``s`` a scale (float or a one-element
tensor). ``g`` broadcasts against ``h``: (B, L, D) per token and channel, (B, L, 1) per token, (D,)
per channel, (B, 1, 1) per sample. ``x`` or ``delta_h`` may be None (then they are left out), so the
same op serves a wrapper that owns the residual add and a hook that only rewrites the branch.

Reference: plain PyTorch in the inputs' promoted dtype. Kernel: ``skipkernels.triton.pet_gate``
(one pass forward; one pass backward that writes dh and reduces dg/ds to g's and s's shapes).
"""
from __future__ import annotations

import torch

from skipkernels.ops import measured
from skipkernels.ops.op import Op, Triton, register
from skipkernels.ops.policy import Backend


def gated_update_reference(x, h, delta_h, g, s):
    u = h if delta_h is None else h + delta_h
    y = (g * s) * u
    return y if x is None else x + y


def gate_kind(g, h) -> str:
    """The granularity a gate stands for (the key of its measurements), from how it broadcasts
    against ``h`` (any layout, channels last): varying over tokens and channels is "large", over
    channels only "middle_y", over every token row "middle_x", over fewer rows (samples) or
    nothing "small"."""
    if not isinstance(g, torch.Tensor) or g.dim() == 0:
        return "small"
    varies_channels = g.shape[-1] != 1
    gate_rows = g.numel() // g.shape[-1]
    token_rows = h.numel() // max(1, h.shape[-1])
    if varies_channels:
        return "large" if gate_rows > 1 else "middle_y"
    return "middle_x" if gate_rows == token_rows and token_rows > 1 else "small"


def gated_update_case(x, h, delta_h, g, s=1.0):
    """The measured table's key: (width, gate granularity) and the row count."""
    return (h.shape[-1], gate_kind(g, h)), measured.rows_of(h)


def gated_update_dtype(x, h, delta_h, g, s=1.0) -> str:
    """The tensors' own promoted dtype: autocast does not touch this elementwise op."""
    dtype = h.dtype
    for t in (x, delta_h, g):
        if isinstance(t, torch.Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return str(dtype)


# The kernel runs for auto only where a GPU measurement (ops/measured.py) shows it beating the
# eager reference at this width, gate granularity, row count and dtype.
GATED_UPDATE = register(Op("pet_gate", gated_update_reference, case=gated_update_case, dtype=gated_update_dtype, anchor=1,
                           impls=(Triton("pet_gate", "gated_update"),)))


def gated_update(x, h, delta_h, g, s=1.0, backend: Backend = None):
    """``x + s * g * (h + delta_h)`` through the chosen backend (see module docstring). No
    compiled (cpu/cuda) version exists: an elementwise op is Triton's job, and the reference is
    what every other backend runs."""
    return GATED_UPDATE(x, h, delta_h, g, s, backend=backend)
