"""docs/ARCHITECTURE.md's worked example of an op declaration is the code's, and it dispatches."""
import re
from pathlib import Path

import torch

import dataclasses

from skipkernels.ops import op, pet_gate

DOC = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md"


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
