"""The bad-input table (tests/support/bad_inputs.py) on CUDA: every case ends in a Python exception, a
device-side flag that check_cuda_errors() raises, or a defined result; the process survives."""
import re

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from bad_inputs import CASES, Defined, Flagged, Raises, reference_for  # noqa: E402
from skipkernels import _ext  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.CUDA_BUILT, reason="skipkernels._C built without CUDA")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_on_cuda(case):
    _ext._C.cuda_error_flags(torch.cuda.current_device(), True)  # start with a clean error word
    expect = case.expected("cuda")
    if isinstance(expect, Raises):
        with pytest.raises(expect.type) as info:
            case.call("cuda")
        assert re.search(expect.pattern, str(info.value)), str(info.value)
    elif isinstance(expect, Flagged):
        case.call("cuda")
        torch.cuda.synchronize()  # the context is still usable: nothing was written out of bounds
        with pytest.raises(ValueError, match=expect.pattern):
            _ext.check_cuda_errors()
    else:
        assert isinstance(expect, Defined)
        assert expect.check(case.call("cuda"), reference_for(case, "cuda"))
    torch.cuda.synchronize()
