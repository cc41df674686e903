"""Shared checks of the kernel tests: poisoned outputs and the fp64 error rule
(docs/ARCHITECTURE.md, "Testing and measuring")."""
import os

import pytest
import torch

import skipkernels.triton as skt

SEED = int(os.environ.get("SKIPKERNELS_TEST_SEED", "0"))  # redraw every random input with another seed


@pytest.fixture(autouse=True)
def poison_outputs():
    """Kernel outputs start as NaN, so any element a kernel fails to write fails the test.
    Import it into a test module to apply it there."""
    with skt.launch_settings(poison=True):
        yield


def max_error(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def assert_fp64_rule(out, torch_out, ref64, what, scale=None):
    """Fused error vs fp64 at most 2x PyTorch's own error in the same dtype, plus a few ulps.

    The slack covers fp32 summation-order noise (a max over a small tensor can land on an element
    where torch happens to be exact); fp16/bf16 results are rounded once, so they get one ulp.
    The ulps are taken at ``scale``, by default the tensor's own magnitude; gradients of a block
    pass the block's largest gradient, since all of them carry rounding noise at that level.
    """
    assert not torch.isnan(out).any(), f"{what}: NaN (unwritten output?)"
    e_fused, e_torch = max_error(out, ref64), max_error(torch_out, ref64)
    ulps = 4 if out.dtype == torch.float32 else 1
    scale = ref64.abs().max().item() if scale is None else scale
    eps = ulps * torch.finfo(out.dtype).eps * max(1.0, scale)
    assert e_fused <= 2 * e_torch + eps, f"{what}: error {e_fused:.3g} vs torch {e_torch:.3g} (+{eps:.3g})"


def saved_activation_bytes(fn, params) -> int:
    """Bytes autograd saves for backward while running ``fn()``, by storage, parameters (and
    views of them) excluded."""
    params_at = {t.data_ptr() for t in params}
    sizes = {}

    def pack(t):
        if t.data_ptr() not in params_at:
            sizes[t.data_ptr()] = max(sizes.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())
