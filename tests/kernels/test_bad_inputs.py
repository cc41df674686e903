"""Every bad input to every compiled op ends in a Python exception with a clear message (CPU).

The cases are the table in tests/support/bad_inputs.py; tests/cuda/test_cuda_bad_inputs.py runs the same
table on a GPU, where the declared-size paths flag bad labels on the device instead of raising.
"""
import re

import pytest

from bad_inputs import CASES, Defined, Raises, reference_for
from skipkernels import _ext

pytestmark = pytest.mark.skipif("class_select" not in _ext.COMPILED_OPS, reason="skipkernels._C not built")

CPU_CASES = [c for c in CASES if not c.cuda_only]


@pytest.mark.parametrize("case", CPU_CASES, ids=[c.name for c in CPU_CASES])
def test_bad_input_on_cpu(case):
    expect = case.expected("cpu")
    if isinstance(expect, Raises):
        with pytest.raises(expect.type) as info:
            case.call("cpu")
        assert re.search(expect.pattern, str(info.value)), str(info.value)
        assert "Exception raised from" not in str(info.value).split("\n")[0]
    else:
        assert isinstance(expect, Defined)
        assert expect.check(case.call("cpu"), reference_for(case, "cpu"))


def test_table_covers_every_compiled_op():
    called = " ".join(c.name for c in CASES)
    for prefix in ("select:", "ce:", "ce backward:", "topk:"):
        assert prefix in called
