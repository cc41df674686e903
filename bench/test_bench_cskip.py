"""Microbenchmarks of the CSkip ops: compiled (csrc) vs the PyTorch reference vs torch.compile of
the reference, side by side in one run.

    pytest bench/test_bench_cskip.py --benchmark-only --benchmark-group-by=group \
        --benchmark-json=bench/results/cskip_<device>.json

CPU: small shapes. CUDA: B in {4, 32, 256}, K' in {77, 1000}, D = 512; each case is also timed
with triton.testing.do_bench (CUDA events), stored as extra_info["do_bench_ms"], because the
pytest-benchmark wall time includes a synchronisation per call.
"""
import pytest
import torch
import torch.nn.functional as F

from skipkernels import _ext
from skipkernels.ops import _subset_ce_autograd
from skipkernels.ops.class_select import class_select_reference, draw_rank_mask
from skipkernels.ops.subset_ce import (class_scores_topk_chunked, class_scores_topk_reference,
                                      subset_logits_ce_reference)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
WIDTH = 512
IMPLS = ["reference", "compiled", "torch_compile"]


def cases(device):
    if device == "cuda":
        return [(b, k) for b in (4, 32, 256) for k in (77, 1000)]
    return [(4, 77), (32, 1000)]


PARAMS = [(device, b, k) for device in DEVICES for b, k in cases(device)]
IDS = [f"{device}-B{b}-K{k}" for device, b, k in PARAMS]


def _prepare(impl, device, reference, compiled_op, op_name):
    if impl == "compiled":
        if not _ext.has_kernel(op_name, device):
            pytest.skip(f"compiled {op_name} unavailable on {device}: {_ext.load_error or 'no CUDA build'}")
        return compiled_op
    if impl == "torch_compile":
        return torch.compile(reference)
    return reference


def _run(benchmark, fn, device, group):
    benchmark.group = group
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    benchmark.extra_info["torch"] = torch.__version__
    try:
        for _ in range(3):  # warm-up; torch.compile compiles here
            fn()
    except Exception as err:  # torch.compile may not handle the reference on this setup
        pytest.skip(f"not runnable here: {type(err).__name__}: {err}")
    if device == "cuda":
        import triton.testing
        torch.cuda.synchronize()
        benchmark.extra_info["do_bench_ms"] = triton.testing.do_bench(fn, warmup=25, rep=200)

        def timed():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=100, iterations=1, warmup_rounds=5)
    else:
        benchmark(fn)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,batch,classes", PARAMS, ids=IDS)
def test_class_select(benchmark, device, batch, classes, impl):
    """Selection over C = 1000 classes (C = 10 * K' for K' = 77) with a declared subset size."""
    num_classes = max(1000, 10 * classes)
    top_k = min(classes, 50)
    gen = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(batch, WIDTH, generator=gen), dim=-1).to(device)
    t = F.normalize(torch.randn(num_classes, WIDTH, generator=gen), dim=-1).to(device)
    labels = torch.full((batch,), 7).to(device)  # one class per batch (the paper's sampler)
    mask = draw_rank_mask(num_classes, top_k, 0.3, gen).to(device)
    size = top_k + int(mask.sum())
    op = _prepare(impl, device, class_select_reference,
                  lambda *a: torch.ops.skipkernels.class_select(*a), "class_select")
    _run(benchmark, lambda: op(f, t, labels, mask, top_k, size), device,
         f"class_select {device} B={batch} C={num_classes}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,batch,classes", PARAMS, ids=IDS)
def test_subset_ce_forward_backward(benchmark, device, batch, classes, impl):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(batch, WIDTH, generator=gen).to(device).requires_grad_()
    t = torch.randn(classes, WIDTH, generator=gen).to(device).requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    labels = torch.randint(classes, (batch,), generator=gen).to(device)
    loss_fn = _prepare(impl, device, subset_logits_ce_reference, _subset_ce_autograd.apply, "subset_logits_ce")

    def step():
        loss = loss_fn(f, t, scale, labels)
        return torch.autograd.grad(loss, (f, t, scale))

    _run(benchmark, step, device, f"subset_logits_ce fwd+bwd {device} B={batch} K'={classes}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,batch,classes", PARAMS, ids=IDS)
def test_subset_ce_forward(benchmark, device, batch, classes, impl):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(batch, WIDTH, generator=gen).to(device)
    t = torch.randn(classes, WIDTH, generator=gen).to(device)
    scale = torch.tensor(100.0, device=device)
    labels = torch.randint(classes, (batch,), generator=gen).to(device)
    loss_fn = _prepare(impl, device, subset_logits_ce_reference,
                       lambda *a: torch.ops.skipkernels.subset_logits_ce(*a)[0], "subset_logits_ce")
    with torch.no_grad():
        _run(benchmark, lambda: loss_fn(f, t, scale, labels), device,
             f"subset_logits_ce fwd {device} B={batch} K'={classes}")


TOPK_PARAMS = [("cpu", 32, 2000)] + ([("cuda", 256, 21843), ("cuda", 1024, 21843)] if torch.cuda.is_available() else [])
TOPK_IMPLS = ["reference", "chunked", "compiled"]


@pytest.mark.parametrize("impl", TOPK_IMPLS)
@pytest.mark.parametrize("device,batch,classes", TOPK_PARAMS, ids=[f"{d}-B{b}-C{c}" for d, b, c in TOPK_PARAMS])
def test_class_scores_topk(benchmark, device, batch, classes, impl):
    """Large-class evaluation: top-5 and loss. 'reference' builds the (B, C) matrix; 'chunked'
    (PyTorch) and 'compiled' work in chunks of 4096 classes. Peak extra memory in extra_info on CUDA."""
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(batch, WIDTH, generator=gen).to(device)
    t = torch.randn(classes, WIDTH, generator=gen).to(device)
    scale = torch.tensor(100.0, device=device)
    labels = torch.randint(classes, (batch,), generator=gen).to(device)
    fn = {"reference": lambda: class_scores_topk_reference(f, t, scale, 5, labels),
          "chunked": lambda: class_scores_topk_chunked(f, t, scale, 5, labels, 4096),
          "compiled": lambda: torch.ops.skipkernels.class_scores_topk(f, t, scale, 5, labels, 4096)}[impl]
    if impl == "compiled" and not _ext.has_kernel("class_scores_topk", device):
        pytest.skip(f"compiled class_scores_topk unavailable on {device}: {_ext.load_error or 'no CUDA build'}")
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.no_grad():
        _run(benchmark, fn, device, f"class_scores_topk {device} B={batch} C={classes}")
