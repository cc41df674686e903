"""Linear layers with fused epilogues: bias + activation (fc1) and bias + residual (out-proj, fc2).

Reference: plain ``F.linear`` followed by the epilogue. Kernels: ``skipkernels.triton.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skipkernels.ops import measured
from skipkernels.ops.op import Op, Triton, register
from skipkernels.ops.policy import Backend
from skipkernels.triton import ACTIVATIONS  # noqa: F401 - the one list, shared with the kernels


def activation_reference(x, activation: str):
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if activation == "none":
        return x
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def linear_act_reference(x, weight, bias, activation: str):
    return activation_reference(F.linear(x, weight, bias), activation)


def linear_residual_reference(x, weight, bias, residual, scale=None):
    """``residual + scale * (x @ weight.T + bias)``; ``scale`` is a LayerScale vector or None."""
    y = F.linear(x, weight, bias)
    if scale is not None:
        y = y * scale
    return residual + y


def linear_act_case(x, weight, bias, activation: str):
    """The measured table's key: (K, N, activation) and the row count."""
    return (weight.shape[1], weight.shape[0], activation), measured.rows_of(x)


def linear_residual_case(x, weight, bias, residual, scale=None):
    """The measured table's key: (K, N, whether a LayerScale is applied) and the row count."""
    return (weight.shape[1], weight.shape[0], "scale" if scale is not None else "none"), measured.rows_of(x)


# cuBLAS GEMMs with a separate epilogue stay the default except where a GPU measurement
# (ops/measured.py) shows the fused Triton GEMM winning at this key.
LINEAR_ACT = register(Op("linear_act", linear_act_reference, case=linear_act_case,
                         impls=(Triton("linear", "linear_act"),)))
LINEAR_RESIDUAL = register(Op("linear_residual", linear_residual_reference, case=linear_residual_case,
                              impls=(Triton("linear", "linear_residual",
                                            not_supported="linear_residual_not_supported"),)))


def linear_act(x, weight, bias, activation: str, backend: Backend = None):
    return LINEAR_ACT(x, weight, bias, activation, backend=backend)


def linear_residual(x, weight, bias, residual, scale=None, backend: Backend = None):
    return LINEAR_RESIDUAL(x, weight, bias, residual, scale, backend=backend)
