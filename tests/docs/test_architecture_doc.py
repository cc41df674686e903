"""docs/ARCHITECTURE.md's worked example of an op declaration is the code's, and it dispatches."""
import re
from pathlib import Path

import torch

import dataclasses

from skipkernels.ops import op, pet_gate

DOC = Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md"


def _doc_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/ARCHITECTURE.md lost its worked example"
    return blocks[0]


def _normalised(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_the_worked_example_is_the_code():
    """Every line of the example stands in ops/pet_gate.py, in order (the docstring aside)."""
    source = iter(_normalised(Path(pet_gate.__file__).read_text()))
    missing = [line for line in _normalised(_doc_example()) if not any(line == s for s in source)]
    assert not missing, missing


def test_the_worked_example_dispatches_to_its_kernel(monkeypatch):
    calls = []

    @dataclasses.dataclass(frozen=True)
    class Recorded(op.Triton):
        def function(self):
            kernel = super().function()

            def recorded(*args):
                calls.append("kernel")
                return kernel(*args)
            return recorded

    declared = pet_gate.GATED_UPDATE
    monkeypatch.setattr(pet_gate, "GATED_UPDATE", dataclasses.replace(
        declared, impls=(Recorded(declared.impl("triton").module, "gated_update"),), _bound={}))
    x, h, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.rand(8)
    expected = pet_gate.gated_update_reference(x, h, None, g, 0.5)
    torch.testing.assert_close(pet_gate.gated_update(x, h, None, g, 0.5, backend="triton"), expected)
    assert calls == ["kernel"]
    torch.testing.assert_close(pet_gate.gated_update(x, h, None, g, 0.5, backend="torch"), expected)
    assert calls == ["kernel"]  # the reference ran


def test_the_op_is_registered_under_its_name():
    assert op.all_ops()["pet_gate"] is pet_gate.GATED_UPDATE


def _adapter_example() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "def read_block" in b]
    assert len(blocks) == 1, "docs/ARCHITECTURE.md lost its worked example of an adapter"
    return blocks[0]


def test_the_adapter_example_is_the_code():
    """Every line of the adapter example stands in adapters/timm.py, in order."""
    from skipkernels.adapters import timm as timm_adapter
    source = iter(_normalised(Path(timm_adapter.__file__).read_text()))
    missing = [line for line in _normalised(_adapter_example()) if not any(line == s for s in source)]
    assert not missing, missing


def test_a_block_the_adapter_reads_runs_its_own_forward_through_a_plan():
    import pytest
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    from skipkernels.adapters import timm as timm_adapter
    from skipkernels.ops.block import BlockParts, BlockPlan, unsupported_reason
    torch.manual_seed(0)
    block = vision_transformer.Block(32, 4, qk_norm=True, init_values=0.1).eval()
    parts = timm_adapter.read_block(block)
    assert isinstance(parts, BlockParts) and parts.heads == 4 and parts.act_name == "gelu"
    assert timm_adapter.read_block(torch.nn.Linear(2, 2)) is None  # another ecosystem's: not its answer
    assert unsupported_reason(block) is None  # registered: the op layer reads it through the adapter
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(BlockPlan(block, "torch", parts=parts).forward(x), block(x))
    block.drop_path1 = torch.nn.Dropout(0.1)  # not an identity: the adapter says why it cannot be computed
    assert timm_adapter.read_block(block) == "stochastic depth (drop_path)"
