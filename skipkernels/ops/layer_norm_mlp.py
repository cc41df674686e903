"""The MLP sub-block with its residual: ``x + scale * fc2(act(fc1(layer_norm(x))))``.

Reference: ``layer_norm_linear_reference`` then ``linear_residual_reference``. Kernel:
``skipkernels.triton.layer_norm_mlp`` (the fused LN→fc1+act and fc2+residual kernels in one
autograd op that keeps fc1's pre-activation instead of the activation output for backward). When
it is not chosen, the two steps still go through the op layer, each with its own backend choice.
"""
from __future__ import annotations

from skipkernels.ops import measured
from skipkernels.ops.policy import Backend
from skipkernels.ops.layer_norm_linear import LAYER_NORM_LINEAR, layer_norm_linear_reference
from skipkernels.ops.linear import LINEAR_RESIDUAL, linear_residual_reference
from skipkernels.ops.op import Op, Triton, register


def layer_norm_mlp_reference(x, ln_weight, ln_bias, eps: float, w1, b1, activation: str, w2, b2, scale=None):
    h = layer_norm_linear_reference(x, ln_weight, ln_bias, eps, w1, b1, activation)
    return linear_residual_reference(h, w2, b2, x, scale)


def layer_norm_mlp_case(x, ln_weight, ln_bias, eps, w1, b1, activation, w2, b2, scale=None):
    """The measured table's key: (width, hidden width, activation, LayerScale or not) and rows."""
    return (w1.shape[1], w1.shape[0], activation, "scale" if scale is not None else "none"), measured.rows_of(x)


def _composed(policy):
    """LN→fc1+act then fc2+residual, each bound under ``policy`` on its own."""
    first, second = LAYER_NORM_LINEAR.bind(policy), LINEAR_RESIDUAL.bind(policy)

    def fc1_then_fc2(x, ln_weight, ln_bias, eps, w1, b1, activation, w2, b2, scale=None):
        return second(first(x, ln_weight, ln_bias, eps, w1, b1, activation), w2, b2, x, scale)
    fc1_then_fc2.parts = {"layer_norm_linear": first, "linear_residual": second}
    return fc1_then_fc2


# Only where a GPU measurement (ops/measured.py) shows the fused sub-block beating the reference
# composition at this key.
LAYER_NORM_MLP = register(Op("layer_norm_mlp", layer_norm_mlp_reference, case=layer_norm_mlp_case,
                             impls=(Triton("layer_norm_mlp", "layer_norm_mlp"),), composed=_composed))


def layer_norm_mlp(x, ln_weight, ln_bias, eps: float, w1, b1, activation: str, w2, b2, scale=None,
                   backend: Backend = None):
    return LAYER_NORM_MLP(x, ln_weight, ln_bias, eps, w1, b1, activation, w2, b2, scale, backend=backend)
