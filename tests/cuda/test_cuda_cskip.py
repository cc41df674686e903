"""CUDA CSkip ops (csrc/cuda): class_select, subset_logits_ce forward/backward, class_scores_topk
against the references, plus what only a GPU can show: no host synchronisation in the static-size
paths, CUDA-graph capture, device-side error flags. Skipped without a GPU."""
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from skipkernels import _ext  # noqa: E402
from skipkernels.ops import subset_ce  # noqa: E402
from skipkernels.ops.class_select import class_select_reference, draw_rank_mask  # noqa: E402
from skipkernels.ops.subset_ce import class_scores_topk_chunked, subset_logits_ce_reference  # noqa: E402

DEV = "cuda"


def test_extension_was_built_with_cuda():
    # On a GPU machine the suite runs with the CUDA ops built; a CPU-only build is a build error.
    assert _ext.CUDA_BUILT, f"skipkernels._C has no CUDA kernels: {_ext.load_error or 'built without CUDA'}"


needs_ops = pytest.mark.skipif(not _ext.CUDA_BUILT, reason="skipkernels._C built without CUDA")


def select_case(batch, classes, top_k, seed, dtype=torch.float32, same_class=False, width=512):
    gen = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(batch, width, generator=gen), dim=-1).to(dtype)
    t = F.normalize(torch.randn(classes, width, generator=gen), dim=-1).to(dtype)
    if same_class:
        labels = torch.full((batch,), int(torch.randint(classes, (1,), generator=gen)))
    else:
        labels = torch.randint(classes, (batch,), generator=gen)
    mask = draw_rank_mask(classes, top_k, 0.3, gen)
    return f, t, labels, mask


def to_dev(*xs):
    return [x.to(DEV) for x in xs]


# ----------------------------------------------------------------------------- class_select


@needs_ops
@pytest.mark.parametrize("batch", [1, 3, 4, 32, 256])
@pytest.mark.parametrize("classes", [2, 10, 100, 1000, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_class_select_equals_reference(batch, classes, dtype):
    for top_k in sorted({1, max(1, classes // 3), min(50, classes), classes}):
        for seed, same in ((batch + classes + top_k, False), (3, True)):
            f, t, labels, mask = select_case(batch, classes, top_k, seed, dtype, same)
            expected = class_select_reference(f, t, labels, mask, top_k)
            got = torch.ops.skipkernels.class_select(*to_dev(f, t, labels, mask), top_k, -1)
            assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
            declared = torch.ops.skipkernels.class_select(*to_dev(f, t, labels, mask), top_k, expected[0].numel())
            assert torch.equal(declared[0].cpu(), expected[0]) and torch.equal(declared[1].cpu(), expected[1])


@needs_ops
def test_class_select_exact_ties_float64_int32_labels_and_large_c():
    gen = torch.Generator().manual_seed(4)
    base = torch.randint(-3, 4, (50, 16), generator=gen).double()
    t = torch.cat([base] * 8)
    f = torch.randint(-3, 4, (4, 16), generator=gen).double()
    labels = torch.tensor([3, 3, 120, 399])
    for top_k in (1, 7, 64, 400):
        mask = draw_rank_mask(400, top_k, 0.5, gen)
        expected = class_select_reference(f, t, labels, mask, top_k)
        got = torch.ops.skipkernels.class_select(*to_dev(f, t, labels.int(), mask), top_k, -1)
        assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    f, t, labels, mask = select_case(32, 21843, 50, 1, width=64)  # ImageNet-21k-sized class set
    expected = class_select_reference(f, t, labels, mask, 50)
    got = torch.ops.skipkernels.class_select(*to_dev(f, t, labels, mask), 50, -1)
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])


@needs_ops
def test_class_select_declared_size_never_synchronises():
    f, t, labels, mask = to_dev(*select_case(4, 1000, 50, 0))
    size = 50 + int(mask.sum())
    torch.ops.skipkernels.class_select(f, t, labels, mask, 50, size)  # warm-up (allocator, modules)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        selected, remapped = torch.ops.skipkernels.class_select(f, t, labels, mask, 50, size)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert selected.shape == (size,)
    assert torch.equal(selected[remapped], labels)


@needs_ops
def test_class_select_bad_labels_flagged_not_crashing():
    _ext.check_cuda_errors()  # start clean
    f, t, labels, mask = to_dev(*select_case(4, 100, 10, 0))
    size = 10 + int(mask.sum())
    bad = torch.tensor([0, 100, -5, 3], device=DEV)
    selected, remapped = torch.ops.skipkernels.class_select(f, t, bad, mask, 10, size)
    torch.cuda.synchronize()  # the context is still usable: nothing was written out of bounds
    assert selected.shape == (size,) and bool((selected >= 0).all() and (selected < 100).all())
    assert bool((remapped >= 0).all() and (remapped < size).all())
    with pytest.raises(ValueError, match="label outside"):
        _ext.check_cuda_errors()
    _ext.check_cuda_errors()  # reset by the previous call
    with pytest.raises(ValueError, match="labels must lie in"):  # dynamic size: raised directly
        torch.ops.skipkernels.class_select(f, t, bad, mask, 10, -1)
    # A declared size that does not match: 12 distinct labels, top_k 10, nothing else kept.
    many = torch.arange(12, device=DEV)
    f12 = torch.randn(12, f.shape[1], device=DEV)
    none = torch.zeros_like(mask)
    selected, remapped = torch.ops.skipkernels.class_select(f12, t, many, none, 10, 10)
    assert selected.shape == (10,) and bool((remapped < 10).all())
    with pytest.raises(ValueError, match="differs from num_selected"):
        _ext.check_cuda_errors()


@needs_ops
def test_class_select_rejects_mixed_devices():
    f, t, labels, mask = select_case(4, 100, 10, 0)
    with pytest.raises(ValueError, match="rank_mask is on cpu"):
        torch.ops.skipkernels.class_select(f.cuda(), t.cuda(), labels.cuda(), mask, 10, -1)


# ----------------------------------------------------------------------------- subset_logits_ce


def ce_case(batch, classes, width, seed, dtype=torch.float32, same_class=False):
    gen = torch.Generator().manual_seed(seed)
    f = (torch.randn(batch, width, generator=gen) * (0.5 + 3 * torch.rand(batch, 1, generator=gen))).to(dtype)
    t = (torch.randn(classes, width, generator=gen) * (0.5 + 3 * torch.rand(classes, 1, generator=gen))).to(dtype)
    scale = torch.tensor(10 + 90 * torch.rand((), generator=gen).item())
    labels = (torch.full((batch,), int(torch.randint(classes, (1,), generator=gen))) if same_class
              else torch.randint(classes, (batch,), generator=gen))
    return f, t, scale, labels


def oracle(f, t, scale, labels, return_logits=False):
    logits = scale.double() * (F.normalize(f.double(), dim=-1) @ F.normalize(t.double(), dim=-1).T)
    loss = F.cross_entropy(logits, labels)
    return (loss, logits) if return_logits else loss


def grads_of(fn, f, t, scale, labels, weight=None):
    f, t, scale = (x.detach().clone().requires_grad_() for x in (f, t, scale))
    if weight is None:
        loss = total = fn(f, t, scale, labels)
    else:
        loss, logits = fn(f, t, scale, labels, True)
        total = loss + (logits * weight.to(logits.dtype)).sum()
    total.backward()
    return loss, f.grad, t.grad, scale.grad


def compiled_fn(f, t, scale, labels, return_logits=False):
    return subset_ce.subset_logits_ce(f, t, scale, labels, return_logits, backend="cuda")


def max_err(x, exact):
    return (x.detach().double() - exact.detach().double()).abs().max().item()


def ulp_floor(exact, dtype):
    return torch.finfo(dtype).eps * max(1.0, exact.detach().abs().max().item())


@needs_ops
@pytest.mark.parametrize("batch,classes,width", [(1, 1, 8), (3, 2, 16), (4, 77, 512), (4, 1000, 512),
                                                 (32, 77, 512), (32, 1000, 512), (256, 1000, 512),
                                                 (5, 33, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_logits", [False, True])
def test_subset_ce_within_twice_reference_error(batch, classes, width, dtype, with_logits):
    names = ("loss", "grad f", "grad t", "grad scale")
    sums = {n: [0.0, 0.0, 0.0] for n in names}
    draws = 4
    for seed in range(draws):
        f, t, scale, labels = to_dev(*ce_case(batch, classes, width, seed * 31 + batch, dtype, seed % 2 == 1))
        weight = torch.randn(batch, classes, device=DEV) if with_logits else None
        exact = grads_of(oracle, f, t, scale, labels, weight)
        ref = grads_of(subset_logits_ce_reference, f, t, scale, labels, weight)
        got = grads_of(compiled_fn, f, t, scale, labels, weight)
        assert got[1].dtype == dtype and got[2].dtype == dtype
        for name, g, r, e in zip(names, got, ref, exact):
            sums[name][0] += max_err(g, e) / draws
            sums[name][1] += max_err(r, e) / draws
            sums[name][2] += ulp_floor(e, g.dtype) / draws
    for name, (err, ref_err, floor) in sums.items():
        assert err <= 2 * ref_err + floor, f"{name}: mean error {err:.3e} vs the reference's {ref_err:.3e}"


@needs_ops
def test_subset_ce_gradcheck_float64_and_clamped_rows():
    from skipkernels.ops import _subset_ce_autograd
    f, t, scale, labels = to_dev(*ce_case(3, 5, 7, 2, torch.float64))
    inputs = (f.requires_grad_(), t.requires_grad_(), scale.double().requires_grad_(), labels)
    for return_logits in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, s, y: _subset_ce_autograd.apply(a, b, s, y, return_logits), inputs, eps=1e-6, atol=1e-7)
    f, t, scale, labels = to_dev(*ce_case(4, 6, 9, 8, torch.float64))
    f[0] = 0
    f[1] *= 1e-14
    t[2] *= 1e-14
    for g, e in zip(grads_of(compiled_fn, f, t, scale.double(), labels),
                    grads_of(oracle, f, t, scale.double(), labels)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@needs_ops
def test_subset_ce_matches_cpu_kernel_and_is_deterministic():
    f, t, scale, labels = ce_case(32, 1000, 512, 5)
    cpu = grads_of(lambda *a: subset_ce.subset_logits_ce(*a, backend="cpu"), f, t, scale, labels)
    first = grads_of(compiled_fn, *to_dev(f, t, scale, labels))
    second = grads_of(compiled_fn, *to_dev(f, t, scale, labels))
    for a, b, c in zip(first, second, cpu):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-5)


@needs_ops
def test_subset_ce_never_synchronises_and_captures_in_a_cuda_graph():
    f, t, scale, labels = to_dev(*ce_case(32, 77, 512, 9))
    f.requires_grad_()
    t.requires_grad_()
    compiled_fn(f, t, scale, labels).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        compiled_fn(f, t, scale, labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # A captured step (selection + loss + backward) replayed on new data equals eager execution.
    classes = 200
    static = [f.detach().clone(), torch.randn(classes, 512, device=DEV), scale.clone(),
              torch.full_like(labels, 3)]
    proto = F.normalize(torch.randn(classes, 512, device=DEV), dim=-1)
    mask = draw_rank_mask(classes, 50, 0.3).to(DEV)
    size = 50 + int(mask.sum())

    def step(img, txt, s, y):
        selected, remapped = torch.ops.skipkernels.class_select(F.normalize(img.detach(), dim=-1), proto, y, mask,
                                                               50, size)
        img = img.detach().requires_grad_()
        sub = txt.index_select(0, selected).detach().requires_grad_()  # stands in for the text tower
        loss = compiled_fn(img, sub, s, remapped)
        loss.backward()
        return selected, remapped, loss.detach(), img.grad, sub.grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        new = [torch.randn(32, 512, generator=gen), torch.randn(classes, 512, generator=gen) * 2,
               torch.tensor(50.0), torch.randint(classes, (32,), generator=gen)]
        new[3][:] = new[3][0]  # one class per batch, as the paper's sampler for shots >= 4
        for buf, value in zip(static, new):
            buf.copy_(value)
        graph.replay()
        eager = step(*static)
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)


@needs_ops
def test_subset_ce_bad_labels_flagged_not_crashing():
    _ext.check_cuda_errors()
    f, t, scale, labels = to_dev(*ce_case(4, 10, 32, 0))
    bad = torch.tensor([0, 10, 2, -1], device=DEV)
    loss = compiled_fn(f, t, scale, bad)
    assert torch.isnan(loss).item()
    with pytest.raises(ValueError, match="subset_logits_ce got a label outside"):
        _ext.check_cuda_errors()
    with pytest.raises(ValueError, match="feature width mismatch"):
        compiled_fn(f, t[:, :5], scale, labels)
    with pytest.raises(ValueError, match="scale is on cpu"):
        torch.ops.skipkernels.subset_logits_ce(f, t, scale.cpu(), labels)
    # The Python wrapper moves a CPU scale along instead.
    torch.testing.assert_close(compiled_fn(f, t, scale.cpu(), labels), compiled_fn(f, t, scale, labels))


@needs_ops
@pytest.mark.parametrize("chunk", [7, 4096])
def test_class_scores_topk_matches_chunked_reference(chunk):
    f, t, scale, labels = to_dev(*ce_case(32, 1000, 512, 3))
    for k, y in ((1, labels), (5, None)):
        got = subset_ce.class_scores_topk(f, t, scale, k, y, chunk, backend="cuda")
        expected = class_scores_topk_chunked(f, t, scale, k, y, chunk)
        torch.testing.assert_close(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        assert (got[2] is None) == (y is None)
        if y is not None:
            torch.testing.assert_close(got[2], expected[2])


@needs_ops
def test_torch_compile_on_cuda():
    f, t, scale, labels = to_dev(*ce_case(4, 77, 512, 1))
    _, _, _, mask = select_case(4, 77, 10, 0)
    mask = mask.cuda()
    size = 10 + int(mask.sum())

    def fn(img, txt, s, y):
        selected, remapped = torch.ops.skipkernels.class_select(img, txt, y, mask, 10, size)
        return subset_ce.subset_logits_ce(img, txt[selected], s, remapped, backend="cuda")

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(f, t, scale, labels), fn(f, t, scale, labels))
