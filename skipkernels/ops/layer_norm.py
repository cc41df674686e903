"""LayerNorm.

Reference: statistics in fp32 at least (as open_clip's ``LayerNormFp32`` and autocast do; fp64
inputs stay fp64), result in the input dtype. Kernels: ``skipkernels.triton.layer_norm``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skipkernels.ops import measured
from skipkernels.ops.op import Op, Triton, register
from skipkernels.ops.policy import Backend


def layer_norm_reference(x, weight, bias, eps: float):
    compute = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(compute), (x.shape[-1],),
                     None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    return y.to(x.dtype)


def layer_norm_case(x, *_):
    """The measured table's key of layer_norm: (D,) and the row count."""
    return (x.shape[-1],), measured.rows_of(x)


# The kernels run only where a GPU measurement (ops/measured.py) shows them beating PyTorch's LayerNorm.
LAYER_NORM = register(Op("layer_norm", layer_norm_reference, case=layer_norm_case,
                         impls=(Triton("layer_norm", "layer_norm"),)))


def layer_norm(x, weight, bias, eps: float, backend: Backend = None):
    return LAYER_NORM(x, weight, bias, eps, backend=backend)
