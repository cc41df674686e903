"""The op registry: every op is declared once, with its implementations, and `skipkernels info` lists them all."""
import pkgutil

import pytest

import skipkernels.triton
from skipkernels.info import registered_ops, triton_kernels
from skipkernels.ops.op import OPS, Compiled, Op, Triton, register

# Modules of skipkernels/triton that hold helpers, not kernels of an op.
HELPER_MODULES = {"gemm_tiles"}


def test_every_kernel_family_is_declared_by_an_op():
    kernels = triton_kernels()
    assert {"layer_norm", "linear_act", "linear_residual", "layer_norm_linear",
            "layer_norm_mlp", "attention", "pet_gate"} <= set(kernels)
    families = {m.name for m in pkgutil.iter_modules(skipkernels.triton.__path__)} - HELPER_MODULES
    assert families == {k.module for k in kernels.values()}


def test_every_compiled_op_is_declared_by_an_op():
    compiled = {name for name, op in registered_ops().items() if op.impl("compiled") is not None}
    assert compiled == {"class_select", "subset_logits_ce", "class_scores_topk"}
    assert all(isinstance(op.impl("compiled"), Compiled) for name, op in OPS.items() if name in compiled)


def test_each_declaration_names_what_its_module_holds():
    pytest.importorskip("triton")
    for op, kernel in triton_kernels().items():
        module = kernel.load()
        assert module is not None, op
        assert callable(getattr(module, kernel.entry)), op
        if kernel.not_supported:
            assert callable(getattr(module, kernel.not_supported)), op


def test_an_op_is_declared_once():
    with pytest.raises(ValueError, match="declared twice"):
        register(Op("layer_norm", lambda x: x, impls=(Triton("layer_norm", "layer_norm"),)))


def test_a_forced_backend_that_cannot_run_says_why(monkeypatch):
    import torch

    from skipkernels.ops.class_select import CLASS_SELECT
    f, t = torch.randn(2, 4), torch.randn(5, 4)
    args = (f, t, torch.tensor([0, 1]), torch.zeros(3, dtype=torch.bool), 2)
    monkeypatch.setattr(skipkernels._ext, "COMPILED_OPS", frozenset())
    monkeypatch.setattr(skipkernels._ext, "load_error", "built without a compiler")
    with pytest.raises(ValueError, match="compiled class_select op cannot run these inputs: the compiled "
                                         "class_select is not built: built without a compiler"):
        CLASS_SELECT.bind("cpu")(*args)
