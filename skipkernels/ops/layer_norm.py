"""LayerNorm and residual-add + LayerNorm.

Reference: statistics in fp32 (as open_clip's ``LayerNormFp32`` and autocast do), result in the
input dtype. Kernels: ``skipkernels.triton.layer_norm``.
"""
from __future__ import annotations

import torch.nn.functional as F

from skipkernels.ops import _dispatch, measured
from skipkernels.ops.policy import Backend


def layer_norm_reference(x, weight, bias, eps: float):
    y = F.layer_norm(x.float(), (x.shape[-1],),
                     None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return y.to(x.dtype)


def add_layer_norm_reference(x, delta, weight, bias, eps: float):
    """Returns ``(s, layer_norm(s))`` with ``s = x + delta``: the residual stream and its norm."""
    s = x + delta
    return s, layer_norm_reference(s, weight, bias, eps)


LAYER_NORM = _dispatch.TritonKernel("layer_norm", "layer_norm")
ADD_LAYER_NORM = _dispatch.TritonKernel("layer_norm", "add_layer_norm",
                                        not_supported="add_layer_norm_not_supported")


def layer_norm(x, weight, bias, eps: float, backend: Backend = None):
    return _dispatch.dispatch(LAYER_NORM, backend, lambda table: _auto_triton(table, LAYER_NORM.op, x, weight, bias),
                              layer_norm_reference, x, weight, bias, eps)


def add_layer_norm(x, delta, weight, bias, eps: float, backend: Backend = None):
    return _dispatch.dispatch(ADD_LAYER_NORM, backend,
                              lambda table: _auto_triton(table, ADD_LAYER_NORM.op, x, weight, bias, delta),
                              add_layer_norm_reference, x, delta, weight, bias, eps)


def layer_norm_case(x, *_):
    """The measured table's key of layer_norm and add_layer_norm: (D,) and the row count."""
    return (x.shape[-1],), measured.rows_of(x)


def _auto_triton(table, op, x, *tensors) -> bool:
    # Only where a GPU measurement (ops/measured.py) shows the kernel beating PyTorch's LayerNorm.
    return measured.prefers_triton(op, x, *layer_norm_case(x), tensors, table=table)
