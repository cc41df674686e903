"""CSkip loss: logits over the selected class subset and cross-entropy, fused with normalisation.

    loss = CE(scale * normalize(image_features) @ normalize(text_features).T, labels)

image_features (B, E) and text_features (K', E) are un-normalised; ``scale`` is exp(logit_scale),
a 0-d tensor; labels (B,) index the subset. The reference uses autograd; compiled ops
(``torch.ops.skipkernels.subset_logits_ce``) compute forward and backward without materialising
anything larger than (B, K').

``class_scores_topk`` is the evaluation variant: scores of a large class set (C up to ~21k), top-k
and optionally the loss, computed in chunks of classes so peak extra memory is O(B * chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skipkernels.ops.op import Compiled, Op, register
from skipkernels.ops.policy import Backend
from skipkernels.ops.class_select import check_label_range


def _check(image_features, text_features, labels):
    if image_features.dim() != 2 or text_features.dim() != 2:
        raise ValueError("expected image_features (B, E) and text_features (K, E)")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature width mismatch: image {image_features.shape[1]} vs text {text_features.shape[1]}")
    if labels is not None:
        if labels.dim() != 1 or labels.shape[0] != image_features.shape[0]:
            raise ValueError(f"labels must be (B,) with B={image_features.shape[0]}, got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def subset_logits_ce_reference(image_features, text_features, scale, labels, return_logits: bool = False):
    _check(image_features, text_features, labels)
    check_label_range(labels, text_features.shape[0])
    f = F.normalize(image_features.float(), dim=-1)
    t = F.normalize(text_features.float(), dim=-1)
    logits = scale.float() * (f @ t.T)
    loss = F.cross_entropy(logits, labels.long())
    return (loss, logits) if return_logits else loss


def _subset_logits_ce_compiled(image_features, text_features, scale, labels, return_logits: bool = False):
    _check(image_features, text_features, labels)
    from skipkernels.ops import _subset_ce_autograd
    return _subset_ce_autograd.apply(image_features, text_features, scale, labels, return_logits)


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _subset_logits_ce_fake(image_features, text_features, scale, labels):
    # (loss, logits, and the row/column statistics the backward reads)
    dtype = _compute_dtype(image_features, text_features)
    batch, classes = image_features.shape[0], text_features.shape[0]
    new = image_features.new_empty
    return (new((), dtype=dtype), new((batch, classes), dtype=dtype), new((batch,), dtype=dtype),
            new((batch,), dtype=dtype), new((batch,), dtype=dtype), new((classes,), dtype=dtype))


def _subset_logits_ce_backward_fake(grad_loss, grad_logits, image_features, text_features, scale, labels,
                                    cos, row_max, row_log_sum, image_norm, text_norm):
    return (image_features.new_empty(image_features.shape), text_features.new_empty(text_features.shape),
            scale.new_empty(scale.shape))


SUBSET_LOGITS_CE = register(Op("subset_logits_ce", subset_logits_ce_reference, impls=(
    Compiled("subset_logits_ce", _subset_logits_ce_compiled,
             fakes=(("subset_logits_ce", _subset_logits_ce_fake),
                    ("subset_logits_ce_backward", _subset_logits_ce_backward_fake))),)))


def subset_logits_ce(image_features, text_features, scale, labels, return_logits: bool = False,
                     backend: Backend = None):
    return SUBSET_LOGITS_CE(image_features, text_features, scale, labels, return_logits, backend=backend)


def class_scores_topk_reference(image_features, text_features, scale, k: int = 1, labels=None):
    """Full-matrix oracle: (top-k values (B, k), top-k indices (B, k), mean CE loss or None)."""
    _check(image_features, text_features, labels)
    f = F.normalize(image_features.float(), dim=-1)
    t = F.normalize(text_features.float(), dim=-1)
    logits = scale.float() * (f @ t.T)
    values, indices = logits.topk(min(k, logits.shape[1]), dim=1)
    loss = F.cross_entropy(logits, labels.long()) if labels is not None else None
    return values, indices, loss


def class_scores_topk(image_features, text_features, scale, k: int = 1, labels=None, chunk_size: int = 4096,
                      backend: Backend = None):
    """Chunked over classes: never builds the (B, C) matrix; same result as the reference."""
    return CLASS_SCORES_TOPK(image_features, text_features, scale, k, labels, chunk_size, backend=backend)


def _class_scores_topk_compiled(image_features, text_features, scale, k: int = 1, labels=None,
                                chunk_size: int = 4096):
    _check(image_features, text_features, labels)
    if scale.device != image_features.device:
        scale = scale.to(image_features.device)
    return torch.ops.skipkernels.class_scores_topk(image_features, text_features, scale, k, labels, chunk_size)


@torch.no_grad()
def class_scores_topk_chunked(image_features, text_features, scale, k: int = 1, labels=None, chunk_size: int = 4096):
    _check(image_features, text_features, labels)
    num_classes = text_features.shape[0]
    k = min(k, num_classes)
    f = F.normalize(image_features.float(), dim=-1)
    batch = f.shape[0]
    best_values = torch.full((batch, 0), float("-inf"), device=f.device)
    best_indices = torch.zeros((batch, 0), dtype=torch.long, device=f.device)
    # online log-sum-exp for the loss
    running_max = torch.full((batch,), float("-inf"), device=f.device)
    running_sum = torch.zeros(batch, device=f.device)
    target_logit = torch.zeros(batch, device=f.device)
    for start in range(0, num_classes, chunk_size):
        t = F.normalize(text_features[start:start + chunk_size].float(), dim=-1)
        logits = scale.float() * (f @ t.T)
        chunk_values, chunk_idx = logits.topk(min(k, logits.shape[1]), dim=1)
        values = torch.cat([best_values, chunk_values], 1)
        indices = torch.cat([best_indices, chunk_idx + start], 1)
        best_values, order = values.topk(min(k, values.shape[1]), dim=1)
        best_indices = indices.gather(1, order)
        if labels is not None:
            new_max = torch.maximum(running_max, logits.amax(1))
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(logits - new_max[:, None]).sum(1)
            running_max = new_max
            inside = (labels >= start) & (labels < start + logits.shape[1])
            local = (labels - start).clamp(0, logits.shape[1] - 1).long()
            target_logit = torch.where(inside, logits.gather(1, local[:, None]).squeeze(1), target_logit)
    loss = None
    if labels is not None:
        loss = (running_max + torch.log(running_sum) - target_logit).mean()
    return best_values, best_indices, loss


# The chunked PyTorch version is this op's reference: the full-matrix oracle above is for tests.
def _class_scores_topk_fake(image_features, text_features, scale, k, labels, chunk_size):
    k = min(k, text_features.shape[0])
    batch = image_features.shape[0]
    values = image_features.new_empty((batch, k), dtype=torch.float32)
    indices = image_features.new_empty((batch, k), dtype=torch.long)
    loss = image_features.new_empty((), dtype=torch.float32) if labels is not None else None
    return values, indices, loss


CLASS_SCORES_TOPK = register(Op("class_scores_topk", class_scores_topk_chunked, impls=(
    Compiled("class_scores_topk", _class_scores_topk_compiled,
             fakes=(("class_scores_topk", _class_scores_topk_fake),)),)))
