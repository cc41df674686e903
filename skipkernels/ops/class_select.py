"""CSkip class selection (docs/ARCHITECTURE.md, "The algorithm").

Given the batch's normalised image features f (B, E), the frozen zero-shot prototypes t (C, E),
the batch labels (B,), a keep-mask over rank positions K..C-1 and K:

    s_c = max_i <f_i, t_c>          (accumulated in fp64, so every backend ranks identically)
    s_y = +inf for every batch label y
    rank classes by s descending, ties broken by the smaller class index
    keep ranks 0..K-1, and rank K+j where rank_mask[j]; labels are always kept
    selected = kept class indices, ascending; remapped[b] = position of labels[b] in selected

Reference here; compiled ops (``csrc/``) registered as ``torch.ops.skipkernels.class_select``.
``num_selected`` >= 0 declares the output size in advance (fixed mask, batch labels <= K): the
compiled ops then need no host synchronisation, which lets a training step be graph-captured.
"""
from __future__ import annotations

import math
import numbers

import torch

from skipkernels.ops.op import Compiled, Op, register
from skipkernels.ops.policy import Backend


def check_cskip_params(top_ratio: float, max_top: int, lam: float, top_count: int | None = None) -> None:
    """The one check of CSkip's parameters (SkipConfig, ClassSkipper and the functions below)."""
    _check_top(top_ratio, max_top, top_count)
    _check_lam(lam)


def _check_top(top_ratio: float, max_top: int, top_count: int | None = None) -> None:
    if not top_ratio > 0:
        raise ValueError(f"top_ratio must be > 0, got {top_ratio}")
    if max_top < 1:
        raise ValueError(f"max_top must be >= 1, got {max_top}")
    if top_count is not None and (isinstance(top_count, bool) or not isinstance(top_count, numbers.Integral)
                                  or top_count < 1):
        raise ValueError(f"top_count must be an integer >= 1 (a number of classes), got {top_count!r}")


def _check_lam(lam: float) -> None:
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Labels (on the host, or read back: one synchronisation) must index the classes."""
    if not labels.numel():
        return
    low, high = (int(v) for v in torch.stack(torch.aminmax(labels)).tolist())  # one read-back
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{low}, {high}]")


def top_k_for(num_classes: int, top_ratio: float, max_top: int, top_count: int | None = None) -> int:
    """K, the number of top-ranked classes CSkip always keeps: the authors' rule (SkipTuning,
    ``trainers/skip_tuning.py``, ``select_classes``), float arithmetic included.

    r <= 1 is a ratio: ceil(r*C). r > 1 is a count: ceil(min(r, C)), so 2.5 keeps 3. Either is
    then capped at ``max_top``. r == 1.0 keeps every class (CSkip off), whatever ``max_top``.
    ``top_count`` (when not None, ``top_ratio`` is not read) is the count spelled as one:
    K = min(top_count, C, max_top), the same K as r = top_count > 1.
    CSkip is off wherever K == C (``ClassSkipper.enabled``)."""
    if num_classes < 1:
        raise ValueError("class selection needs at least one class")
    _check_top(top_ratio, max_top, top_count)
    if top_count is not None:
        return int(min(top_count, num_classes, max_top))
    if top_ratio == 1.0:
        return int(num_classes)
    count = math.ceil(top_ratio * num_classes) if top_ratio < 1 else math.ceil(min(top_ratio, num_classes))
    return int(min(count, max_top))


def rank_keep_probs(count: int, lam: float) -> torch.Tensor:
    """Keep probability of rank positions K..C-1: the min-max normalised exponential pdf with
    scale ``lam`` at linspace(0, 5, count), so the first is 1 and the last 0.

    One position (C - K == 1) is the first lower rank, which is always kept: p = 1. The authors'
    normalisation divides 0 by 0 there and keeps nothing, which at C = 2 leaves a one-class
    subset whose loss is 0 for every batch of one class (docs/DEPARTURES.md)."""
    _check_lam(lam)
    if count <= 1:
        return torch.ones(max(count, 0), dtype=torch.float64)
    x = torch.linspace(0.0, 5.0, count, dtype=torch.float64)
    pdf = torch.exp(-x / lam) / lam
    return (pdf - pdf.min()) / (pdf.max() - pdf.min())


def draw_rank_mask(num_classes: int, top_k: int, lam: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli draw over the C-K rank positions after the top K: keep position j when u_j < p_j."""
    probs = rank_keep_probs(num_classes - top_k, lam)
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64)
    return u < probs


def _check_inputs(image_features, prototypes, labels, rank_mask, top_k):
    if image_features.dim() != 2 or prototypes.dim() != 2:
        raise ValueError(f"expected image_features (B, E) and prototypes (C, E), got "
                         f"{tuple(image_features.shape)} and {tuple(prototypes.shape)}")
    if image_features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"feature width mismatch: image {image_features.shape[1]} vs prototypes {prototypes.shape[1]}")
    num_classes = prototypes.shape[0]
    if labels.dim() != 1 or labels.shape[0] != image_features.shape[0]:
        raise ValueError(f"labels must be (B,) with B={image_features.shape[0]}, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be in [1, C={num_classes}], got {top_k}")
    if rank_mask.dtype != torch.bool or rank_mask.shape != (num_classes - top_k,):
        raise ValueError(f"rank_mask must be bool of shape (C-K,)=({num_classes - top_k},), "
                         f"got {rank_mask.dtype} {tuple(rank_mask.shape)}")


def class_select_reference(image_features, prototypes, labels, rank_mask, top_k: int, num_selected: int = -1):
    _check_inputs(image_features, prototypes, labels, rank_mask, top_k)
    num_classes = prototypes.shape[0]
    check_label_range(labels, num_classes)
    labels = labels.long()
    scores = (image_features.double() @ prototypes.double().T).amax(dim=0)
    scores[labels] = float("inf")
    order = torch.sort(-scores, stable=True).indices  # stable: equal scores keep class order
    keep_rank = torch.cat([torch.ones(top_k, dtype=torch.bool, device=scores.device),
                           rank_mask.to(scores.device)])
    keep = torch.zeros(num_classes, dtype=torch.bool, device=scores.device)
    keep[order] = keep_rank
    keep[labels] = True
    selected = keep.nonzero().flatten()
    position = torch.cumsum(keep.long(), 0) - 1
    remapped = position[labels]
    if num_selected >= 0 and selected.numel() != num_selected:
        raise ValueError(f"declared num_selected={num_selected} but the selection has {selected.numel()} "
                         "classes (more distinct batch labels than top_k?)")
    return selected, remapped


def _class_select_compiled(image_features, prototypes, labels, rank_mask, top_k: int, num_selected: int = -1):
    # With num_selected >= 0 on CUDA, bad labels are flagged on the device, not raised here:
    # see skipkernels._ext.check_cuda_errors.
    _check_inputs(image_features, prototypes, labels, rank_mask, top_k)
    return torch.ops.skipkernels.class_select(image_features, prototypes, labels, rank_mask, top_k, num_selected)


def _class_select_fake(image_features, prototypes, labels, rank_mask, top_k, num_selected):
    if num_selected >= 0:
        size = num_selected
    else:
        size = torch.library.get_ctx().new_dynamic_size(min=top_k, max=prototypes.shape[0])
    return (image_features.new_empty((size,), dtype=torch.long),
            image_features.new_empty(labels.shape, dtype=torch.long))


CLASS_SELECT = register(Op("class_select", class_select_reference, impls=(
    Compiled("class_select", _class_select_compiled, fakes=(("class_select", _class_select_fake),)),)))


def class_select(image_features, prototypes, labels, rank_mask, top_k: int, num_selected: int = -1,
                 backend: Backend = None):
    """Returns (selected class indices ascending (K',), labels remapped into them (B,))."""
    return CLASS_SELECT(image_features, prototypes, labels, rank_mask, top_k, num_selected, backend=backend)
