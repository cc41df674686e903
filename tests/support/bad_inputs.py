"""The table of bad inputs every compiled op is tried with, on CPU (tests/kernels/test_bad_inputs.py) and on
CUDA (tests/cuda/test_cuda_bad_inputs.py).

Each case calls one op, directly (``torch.ops.skipkernels.*``) or through its Python wrapper, and
says what must happen:

- ``Raises(type, pattern)``: a Python exception of that type whose message matches;
- ``Flagged(pattern)``: the declared-size CUDA path does not synchronise, so it cannot raise; it
  must finish without touching memory outside its outputs and set the device error word, which
  ``skipkernels._ext.check_cuda_errors()`` turns into a ValueError matching the pattern;
- ``Defined(check)``: not an error (NaN features, non-contiguous inputs): the op returns and
  ``check(result, reference)`` holds.

The process must survive every case: a crash here fails the whole module, not one test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from skipkernels.ops import class_select as cs
from skipkernels.ops import subset_ce as ce


@dataclass(frozen=True)
class Raises:
    type: type
    pattern: str


@dataclass(frozen=True)
class Flagged:
    pattern: str


@dataclass(frozen=True)
class Defined:
    check: Callable


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable  # call(device) -> result
    expect: object  # on every device unless expect_cuda is given
    expect_cuda: object = None
    cuda_only: bool = False

    def expected(self, device: str):
        return self.expect_cuda if device == "cuda" and self.expect_cuda is not None else self.expect


def _select_inputs(device, batch=4, classes=20, top_k=5, width=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(batch, width, generator=gen)
    t = torch.randn(classes, width, generator=gen)
    labels = torch.randint(classes, (batch,), generator=gen)
    mask = cs.draw_rank_mask(classes, top_k, 0.3, gen)
    return [x.to(device) for x in (f, t, labels, mask)]


def _ce_inputs(device, batch=4, classes=10, width=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(batch, width, generator=gen)
    t = torch.randn(classes, width, generator=gen)
    scale = torch.tensor(50.0)
    labels = torch.randint(classes, (batch,), generator=gen)
    return [x.to(device) for x in (f, t, scale, labels)]


def _select(device, *, f=None, t=None, labels=None, mask=None, top_k=5, num_selected=-1, wrapper=False):
    f0, t0, labels0, mask0 = _select_inputs(device)
    args = (f0 if f is None else f, t0 if t is None else t, labels0 if labels is None else labels,
            mask0 if mask is None else mask, top_k, num_selected)
    if wrapper:
        return cs.class_select(*args, backend=device)
    return torch.ops.skipkernels.class_select(*args)


def _declared(device):
    """num_selected of the default selection inputs (K + kept tail positions)."""
    return 5 + int(_select_inputs(device)[3].sum())


def _ce(device, *, f=None, t=None, scale=None, labels=None, wrapper=False):
    f0, t0, s0, y0 = _ce_inputs(device)
    args = (f0 if f is None else f, t0 if t is None else t, s0 if scale is None else scale,
            y0 if labels is None else labels)
    if wrapper:
        return ce.subset_logits_ce(*args, backend=device)
    return torch.ops.skipkernels.subset_logits_ce(*args)[0]


def _ce_backward(device, *, grad_loss=None, cos=None):
    f, t, s, y = _ce_inputs(device)
    loss, cos0, row_max, row_log_sum, nf, nt = torch.ops.skipkernels.subset_logits_ce(f, t, s, y)
    grad = torch.ones((), device=device) if grad_loss is None else grad_loss
    return torch.ops.skipkernels.subset_logits_ce_backward(
        grad, None, f, t, s, y, cos0 if cos is None else cos, row_max, row_log_sum, nf, nt)


def _topk(device, *, k=3, chunk=4, labels=None):
    f, t, s, y = _ce_inputs(device)
    return torch.ops.skipkernels.class_scores_topk(f, t, s, k, y if labels is None else labels, chunk)


def _same_selection(result, reference):
    return all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(result, reference))


def _bad_labels(device):
    return torch.tensor([0, 20, -5, 3], device=device)


def _nan_rows(device):
    f = _select_inputs(device)[0].clone()
    f[1] = float("nan")
    return f


def _non_contiguous(x):
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    view = wide[:, ::2]
    assert not view.is_contiguous()
    return view


def _is_nan_loss(result, _reference):
    return bool(torch.isnan(result).all())


CASES = [
    # ------------------------------------------------------------------ class_select
    Case("select: label >= C, dynamic size",
         lambda d: _select(d, labels=_bad_labels(d)), Raises(ValueError, r"labels must lie in \[0, 20\)")),
    Case("select: label >= C, wrapper",
         lambda d: _select(d, labels=_bad_labels(d), wrapper=True), Raises(ValueError, r"labels must lie in")),
    Case("select: label >= C, declared size",
         lambda d: _select(d, labels=_bad_labels(d), num_selected=_declared(d)),
         Raises(ValueError, r"labels must lie in"), expect_cuda=Flagged(r"class_select got a label outside")),
    Case("select: more labels than the declared size",  # 8 distinct labels, K = K' = 4
         lambda d: torch.ops.skipkernels.class_select(
             torch.randn(8, 16, device=d), torch.randn(20, 16, device=d), torch.arange(8, device=d),
             torch.zeros(16, dtype=torch.bool, device=d), 4, 4),
         Raises(ValueError, r"num_selected"), expect_cuda=Flagged(r"differs from num_selected")),
    Case("select: top_k = 0", lambda d: _select(d, top_k=0), Raises(ValueError, r"top_k must be in \[1, C=20\]")),
    Case("select: negative top_k", lambda d: _select(d, top_k=-3), Raises(ValueError, r"top_k must be in")),
    Case("select: top_k > C", lambda d: _select(d, top_k=21), Raises(ValueError, r"top_k must be in")),
    Case("select: num_selected > C", lambda d: _select(d, num_selected=21), Raises(ValueError, r"num_selected must be")),
    Case("select: num_selected < top_k", lambda d: _select(d, num_selected=2), Raises(ValueError, r"num_selected must be")),
    Case("select: float labels", lambda d: _select(d, labels=torch.zeros(4, device=d)),
         Raises(TypeError, r"labels must be an int64 or int32")),
    Case("select: integer features", lambda d: _select(d, f=torch.ones(4, 16, dtype=torch.long, device=d)),
         Raises(TypeError, r"image_features must be float32")),
    Case("select: labels of the wrong length", lambda d: _select(d, labels=torch.zeros(3, dtype=torch.long, device=d)),
         Raises(ValueError, r"labels must be \(B,\) with B=4")),
    Case("select: rank_mask of the wrong length", lambda d: _select(d, mask=torch.zeros(3, dtype=torch.bool, device=d)),
         Raises(ValueError, r"rank_mask must be bool of shape")),
    Case("select: rank_mask not bool", lambda d: _select(d, mask=torch.zeros(15, device=d)),
         Raises(ValueError, r"rank_mask must be bool")),
    Case("select: width mismatch", lambda d: _select(d, t=torch.randn(20, 8, device=d)),
         Raises(ValueError, r"feature width mismatch")),
    Case("select: empty batch", lambda d: _select(d, f=torch.randn(0, 16, device=d),
                                                 labels=torch.zeros(0, dtype=torch.long, device=d)),
         Raises(ValueError, r"at least one image")),
    Case("select: no classes", lambda d: _select(d, t=torch.randn(0, 16, device=d), top_k=1,
                                                mask=torch.zeros(0, dtype=torch.bool, device=d)),
         Raises(ValueError, r"at least one class|top_k must be in")),
    Case("select: 1-d features", lambda d: _select(d, f=torch.randn(16, device=d)),
         Raises(ValueError, r"expected image_features \(B, E\)")),
    Case("select: NaN feature rows", lambda d: _select(d, f=_nan_rows(d)),
         Defined(lambda r, ref: _same_selection(r, ref))),
    Case("select: non-contiguous features", lambda d: _select(d, f=_non_contiguous(_select_inputs(d)[0])),
         Defined(lambda r, ref: _same_selection(r, ref))),
    Case("select: inputs on two devices",
         lambda d: _select(d, mask=_select_inputs("cpu")[3]), Raises(ValueError, r"rank_mask is on cpu"),
         cuda_only=True),
    # ------------------------------------------------------------------ subset_logits_ce
    Case("ce: label >= K'", lambda d: _ce(d, labels=torch.tensor([0, 10, 2, -1], device=d)),
         Raises(ValueError, r"labels must lie in \[0, 10\)"),
         expect_cuda=Flagged(r"subset_logits_ce got a label outside")),  # its loss term is NaN
    Case("ce: label >= K', wrapper", lambda d: _ce(d, labels=torch.tensor([0, 10, 2, -1], device=d), wrapper=True),
         Raises(ValueError, r"labels must lie in"), expect_cuda=Flagged(r"subset_logits_ce got a label outside")),
    Case("ce: float labels", lambda d: _ce(d, labels=torch.zeros(4, device=d)),
         Raises(TypeError, r"labels must be an int64 or int32")),
    Case("ce: integer features", lambda d: _ce(d, t=torch.ones(10, 16, dtype=torch.int32, device=d)),
         Raises(TypeError, r"text_features must be float32")),
    Case("ce: width mismatch", lambda d: _ce(d, t=torch.randn(10, 5, device=d)),
         Raises(ValueError, r"feature width mismatch")),
    Case("ce: scale of two values", lambda d: _ce(d, scale=torch.ones(2, device=d)),
         Raises(ValueError, r"scale must hold one value")),
    Case("ce: integer scale", lambda d: _ce(d, scale=torch.tensor(3, device=d)),
         Raises(TypeError, r"scale must be float32")),
    Case("ce: empty batch", lambda d: _ce(d, f=torch.randn(0, 16, device=d),
                                         labels=torch.zeros(0, dtype=torch.long, device=d)),
         Raises(ValueError, r"at least one image")),
    Case("ce: no classes", lambda d: _ce(d, t=torch.randn(0, 16, device=d)),
         Raises(ValueError, r"at least one class")),
    Case("ce: NaN features", lambda d: _ce(d, f=torch.full((4, 16), float("nan"), device=d)),
         Defined(_is_nan_loss)),
    Case("ce: non-contiguous features", lambda d: _ce(d, f=_non_contiguous(_ce_inputs(d)[0])),
         Defined(lambda r, ref: math.isclose(float(r), float(ref), rel_tol=1e-5))),
    Case("ce: inputs on two devices", lambda d: _ce(d, scale=torch.tensor(50.0)),
         Raises(ValueError, r"scale is on cpu"), cuda_only=True),
    Case("ce backward: saved tensors of another shape", lambda d: _ce_backward(d, cos=torch.zeros(4, 3, device=d)),
         Raises(ValueError, r"saved tensors do not match")),
    Case("ce backward: grad_loss of two values", lambda d: _ce_backward(d, grad_loss=torch.ones(2, device=d)),
         Raises(ValueError, r"grad_loss must hold one value")),
    # ------------------------------------------------------------------ class_scores_topk
    Case("topk: negative k", lambda d: _topk(d, k=-1), Raises(ValueError, r"k must be >= 0")),
    Case("topk: chunk 0", lambda d: _topk(d, chunk=0), Raises(ValueError, r"chunk_size must be >= 1")),
    Case("topk: label >= C", lambda d: _topk(d, labels=torch.tensor([0, 10, 2, 1], device=d)),
         Raises(ValueError, r"labels must lie in \[0, 10\)")),
]


def reference_for(case: Case, device: str):
    """What a ``Defined`` case is compared with: the same call on the reference path."""
    name = case.name
    if name.startswith("select"):
        f, t, labels, mask = _select_inputs("cpu")
        if "NaN" in name:
            f = _nan_rows("cpu")
        return cs.class_select_reference(f, t, labels, mask, 5)
    if name.startswith("ce"):
        f, t, s, y = _ce_inputs("cpu")
        return ce.subset_logits_ce_reference(f, t, s, y)
    return None
