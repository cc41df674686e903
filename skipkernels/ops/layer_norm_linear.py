"""LayerNorm followed by a linear layer with its epilogue: the block's LN→QKV and LN→fc1+GELU.

Reference: ``layer_norm_reference`` then ``linear_act_reference`` (the LN output is rounded to x's
dtype, then the GEMM). Kernel: ``skipkernels.triton.layer_norm_linear`` (LN in the GEMM's
prologue, one launch, the normalised rows never stored). When the fused kernel is not chosen the
two steps still go through the op layer, so each keeps its own backend choice.
"""
from __future__ import annotations

from skipkernels.ops import _dispatch, measured
from skipkernels.ops.policy import Backend
from skipkernels.ops.layer_norm import layer_norm, layer_norm_reference
from skipkernels.ops.linear import linear_act, linear_act_reference


def layer_norm_linear_reference(x, ln_weight, ln_bias, eps: float, weight, bias, activation: str = "none"):
    return linear_act_reference(layer_norm_reference(x, ln_weight, ln_bias, eps), weight, bias, activation)


LAYER_NORM_LINEAR = _dispatch.TritonKernel("layer_norm_linear", "layer_norm_linear")


def layer_norm_linear(x, ln_weight, ln_bias, eps: float, weight, bias, activation: str = "none",
                      backend: Backend = None):
    def composed(x, ln_weight, ln_bias, eps, weight, bias, activation):
        h = layer_norm(x, ln_weight, ln_bias, eps, backend=backend)
        return linear_act(h, weight, bias, activation, backend=backend)
    return _dispatch.dispatch(LAYER_NORM_LINEAR, backend,
                              lambda table: _auto_triton(table, x, activation, ln_weight, ln_bias, weight, bias),
                              composed, x, ln_weight, ln_bias, eps, weight, bias, activation)


def layer_norm_linear_case(x, ln_weight, ln_bias, eps, weight, bias, activation: str = "none"):
    """The measured table's key: (K, N, activation) and the row count."""
    return (weight.shape[1], weight.shape[0], activation), measured.rows_of(x)


def _auto_triton(table, x, activation, ln_weight, ln_bias, weight, bias) -> bool:
    # The fused kernel replaces an ATen LayerNorm plus a cuBLAS GEMM only where a GPU measurement
    # (ops/measured.py) shows it winning at this key.
    case = layer_norm_linear_case(x, ln_weight, ln_bias, None, weight, bias, activation)
    return measured.prefers_triton(LAYER_NORM_LINEAR.op, x, *case, (ln_weight, ln_bias, weight, bias), table=table)
