"""LayerNorm followed by a linear layer with its epilogue: the block's LN→QKV and LN→fc1+GELU.

Reference: ``layer_norm_reference`` then ``linear_act_reference`` (the LN output is rounded to x's
dtype, then the GEMM). Kernel: ``skipkernels.triton.layer_norm_linear`` (LN in the GEMM's
prologue, one launch, the normalised rows never stored). When the fused kernel is not chosen the
two steps still go through the op layer, so each keeps its own backend choice.
"""
from __future__ import annotations

from skipkernels.ops import measured
from skipkernels.ops.policy import Backend
from skipkernels.ops.layer_norm import LAYER_NORM, layer_norm_reference
from skipkernels.ops.linear import LINEAR_ACT, linear_act_reference
from skipkernels.ops.op import Op, Triton, register


def layer_norm_linear_reference(x, ln_weight, ln_bias, eps: float, weight, bias, activation: str = "none"):
    return linear_act_reference(layer_norm_reference(x, ln_weight, ln_bias, eps), weight, bias, activation)


def layer_norm_linear_case(x, ln_weight, ln_bias, eps, weight, bias, activation: str = "none"):
    """The measured table's key: (K, N, activation) and the row count."""
    return (weight.shape[1], weight.shape[0], activation), measured.rows_of(x)


def _composed(policy):
    """LayerNorm then the GEMM, each bound under ``policy`` on its own."""
    norm, linear = LAYER_NORM.bind(policy), LINEAR_ACT.bind(policy)

    def layer_norm_then_linear(x, ln_weight, ln_bias, eps, weight, bias, activation="none"):
        return linear(norm(x, ln_weight, ln_bias, eps), weight, bias, activation)
    layer_norm_then_linear.parts = {"layer_norm": norm, "linear_act": linear}
    return layer_norm_then_linear


# The fused kernel replaces an ATen LayerNorm plus a cuBLAS GEMM only where a GPU measurement
# (ops/measured.py) shows it winning at this key.
LAYER_NORM_LINEAR = register(Op("layer_norm_linear", layer_norm_linear_reference, case=layer_norm_linear_case,
                                impls=(Triton("layer_norm_linear", "layer_norm_linear"),), composed=_composed))


def layer_norm_linear(x, ln_weight, ln_bias, eps: float, weight, bias, activation: str = "none",
                      backend: Backend = None):
    return LAYER_NORM_LINEAR(x, ln_weight, ln_bias, eps, weight, bias, activation, backend=backend)
