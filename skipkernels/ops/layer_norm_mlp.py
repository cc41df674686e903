"""The MLP sub-block with its residual: ``x + scale * fc2(act(fc1(layer_norm(x))))``.

Reference: ``layer_norm_linear_reference`` then ``linear_residual_reference``. Kernel:
``skipkernels.triton.layer_norm_mlp`` (the fused LN→fc1+act and fc2+residual kernels in one
autograd op that keeps fc1's pre-activation instead of the activation output for backward). When
it is not chosen, the two steps still go through the op layer, each with its own backend choice.
"""
from __future__ import annotations

from skipkernels.ops import _dispatch, measured
from skipkernels.ops.policy import Backend
from skipkernels.ops.layer_norm_linear import layer_norm_linear, layer_norm_linear_reference
from skipkernels.ops.linear import linear_residual, linear_residual_reference


def layer_norm_mlp_reference(x, ln_weight, ln_bias, eps: float, w1, b1, activation: str, w2, b2, scale=None):
    h = layer_norm_linear_reference(x, ln_weight, ln_bias, eps, w1, b1, activation)
    return linear_residual_reference(h, w2, b2, x, scale)


LAYER_NORM_MLP = _dispatch.TritonKernel("layer_norm_mlp", "layer_norm_mlp")


def layer_norm_mlp(x, ln_weight, ln_bias, eps: float, w1, b1, activation: str, w2, b2, scale=None,
                   backend: Backend = None):
    def composed(x, ln_weight, ln_bias, eps, w1, b1, activation, w2, b2, scale):
        h = layer_norm_linear(x, ln_weight, ln_bias, eps, w1, b1, activation, backend=backend)
        return linear_residual(h, w2, b2, x, scale, backend=backend)
    return _dispatch.dispatch(LAYER_NORM_MLP, backend,
                              lambda table: _auto_triton(table, x, activation, ln_weight, ln_bias, w1, b1, w2, b2,
                                                         scale),
                              composed, x, ln_weight, ln_bias, eps, w1, b1, activation, w2, b2, scale)


def layer_norm_mlp_case(x, ln_weight, ln_bias, eps, w1, b1, activation, w2, b2, scale=None):
    """The measured table's key: (width, hidden width, activation, LayerScale or not) and rows."""
    return (w1.shape[1], w1.shape[0], activation, "scale" if scale is not None else "none"), measured.rows_of(x)


def _auto_triton(table, x, activation, ln_weight, ln_bias, w1, b1, w2, b2, scale) -> bool:
    # Only where a GPU measurement (ops/measured.py) shows the fused sub-block beating the
    # reference composition at this key.
    case = layer_norm_mlp_case(x, ln_weight, ln_bias, None, w1, b1, activation, w2, b2, scale)
    return measured.prefers_triton(LAYER_NORM_MLP.op, x, *case, (ln_weight, ln_bias, w1, b1, w2, b2, scale),
                                   table=table)
