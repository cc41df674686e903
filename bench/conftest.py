import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
# torch.compile on a CPU spends tens of seconds in the C++ compiler per case; CI's smoke run skips
# it unless asked for (the GPU runs always include it).
RUN_COMPILE = ON_GPU or os.environ.get("SKIPKERNELS_BENCH_COMPILE") == "1"


def cuda_time(fn, warmup: int = 5, rep: int = 50) -> float:
    """Median seconds of ``fn`` with CUDA events (launches are asynchronous)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") / 1000.0


@pytest.fixture
def device():
    return torch.device("cuda" if ON_GPU else "cpu")


def synced(fn):
    """``fn`` followed by a device synchronisation, so pytest-benchmark's wall clock measures the
    kernels and not only their asynchronous launches (the CUDA-event median is in extra_info)."""
    if not ON_GPU:
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run
