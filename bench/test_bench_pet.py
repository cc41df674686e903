"""The VL-PET gated update ``x + s * g ⊙ (h + delta_h)``, per gate granularity and backend.

ViT-B/16 image-tower shapes on a GPU (batch 32 and 4, 197 tokens, width 768, bf16); tiny shapes on
a CPU so CI can smoke-run it (the Triton numbers there come from the interpreter and say nothing
about speed). Backends: ``torch`` (the eager reference), ``triton`` (the fused kernel),
``compile`` (torch.compile of the reference).
"""
import os

import pytest
import torch

from conftest import ON_GPU, RUN_COMPILE, synced
from skipkernels.ops.measured import case_info
from skipkernels.ops.pet_gate import gated_update, gated_update_case, gated_update_reference

if ON_GPU:
    SHAPES = [(32, 197, 768), (4, 197, 768)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(2, 17, 64)]
    DTYPE = torch.float32

GATES = {
    "large": lambda b, n, d: (b, n, d),
    "middle_x": lambda b, n, d: (b, n, 1),
    "middle_y": lambda b, n, d: (d,),
    "small": lambda b, n, d: (b, 1, 1),
}


def _fused(x, h, dh, g, s):
    return gated_update(x, h, dh, g, s, backend="triton")


@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("backend", ["torch", "triton", "compile"])
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_update(benchmark, shape, gate, backend, pass_, device):
    torch.manual_seed(0)
    grad = pass_ == "forward_backward"
    x, h, dh = (torch.randn(shape, device=device, dtype=DTYPE, requires_grad=grad) for _ in range(3))
    g = torch.rand(GATES[gate](*shape), device=device, dtype=DTYPE, requires_grad=grad)
    dout = torch.randn(shape, device=device, dtype=DTYPE)
    inputs = (x, h, dh, g)

    if backend == "compile":
        if not RUN_COMPILE:
            pytest.skip("torch.compile cases run on a GPU or with SKIPKERNELS_BENCH_COMPILE=1")
        fn = torch.compile(gated_update_reference)
    else:
        fn = _fused if backend == "triton" else gated_update_reference

    def step():
        out = fn(x, h, dh, g, 2.0)
        if grad:
            torch.autograd.grad(out, inputs, dout)
        return out

    if backend == "triton" and not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    step()  # warm-up (compilation, kernel build); an error here is a failure, not a skip
    benchmark.group = f"pet_gate {'x'.join(map(str, shape))} {gate} {pass_}"
    # Bytes moved by an ideal fused pass: read x, h, dh (+ g), write out; backward reads dout,
    # h, dh, g and writes dh (shared by h and delta_h) and dx aliases dout.
    elems = x.numel()
    size = x.element_size()
    fwd_bytes = (4 * elems + g.numel()) * size
    benchmark.extra_info.update(shape=list(shape), gate=gate, dtype=str(DTYPE), backend=backend,
                                case=case_info("pet_gate", gated_update_case(x, h, dh, g)),
                                mode="fwd_bwd" if grad else "fwd",
                                bytes=fwd_bytes + (4 * elems + 2 * g.numel()) * size * grad,
                                device=torch.cuda.get_device_name(0) if ON_GPU else "cpu",
                                torch=torch.__version__)
    if ON_GPU:
        from conftest import cuda_time
        seconds = cuda_time(step)
        benchmark.extra_info["median_s_cuda_events"] = seconds
        benchmark.extra_info["median_ms"] = seconds * 1e3  # read by skipkernels.ops.measured
        benchmark.extra_info["gb_per_s"] = benchmark.extra_info["bytes"] / seconds / 1e9
    benchmark(synced(step))
