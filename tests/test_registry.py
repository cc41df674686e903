"""The op registry: every Triton kernel is declared once, by its op, and `skipkernels info` lists them all."""
import pkgutil

import pytest

import skipkernels.triton
from skipkernels.info import triton_kernels

# Modules of skipkernels/triton that hold helpers, not kernels of an op.
HELPER_MODULES = {"gemm_tiles"}


def test_every_kernel_family_is_declared_by_an_op():
    kernels = triton_kernels()
    assert {"layer_norm", "add_layer_norm", "linear_act", "linear_residual", "layer_norm_linear",
            "layer_norm_mlp", "attention", "pet_gate"} <= set(kernels)
    families = {m.name for m in pkgutil.iter_modules(skipkernels.triton.__path__)} - HELPER_MODULES
    assert families == {k.module for k in kernels.values()}
    assert all(op == k.op for op, k in kernels.items())


def test_each_declaration_names_what_its_module_holds():
    pytest.importorskip("triton")
    for op, kernel in triton_kernels().items():
        module = kernel.load()
        assert module is not None, op
        assert callable(getattr(module, kernel.entry)), op
        if kernel.not_supported:
            assert callable(getattr(module, kernel.not_supported)), op
