"""Autograd of the compiled class-subset logits + cross-entropy, as a ``torch.library`` custom op.

``apply(image_features, text_features, scale, labels, return_logits)`` computes the same values as
``subset_logits_ce_reference`` with ``torch.ops.skipkernels.subset_logits_ce`` forward and
``torch.ops.skipkernels.subset_logits_ce_backward`` backward (schemas in csrc/ops.cpp).

``skipkernels::subset_ce_loss`` wraps the pair so that its backward is registered with
``torch.library.register_autograd`` and its shapes with a fake: torch.compile and AOTAutograd
trace it as one node, forward and backward, and a CUDA graph captures it. Its extra outputs are
what backward needs (cos (B, K'), the row log-sum-exp as max and log-sum, the row norms): nothing
larger than (B, K') is kept. Gradients flow to image_features, text_features and scale (first
order only); ``logits`` (scale * cos) is returned, and differentiable, only when asked for.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("skipkernels::subset_ce_loss", mutates_args=())
def subset_ce_loss(image_features: Tensor, text_features: Tensor, scale: Tensor, labels: Tensor,
                   with_logits: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, cos, row_max, row_log_sum, image_norm, text_norm = torch.ops.skipkernels.subset_logits_ce(
        image_features, text_features, scale, labels)
    logits = scale.to(cos.dtype) * cos if with_logits else cos.new_empty((0,))
    return loss, logits, cos, row_max, row_log_sum, image_norm, text_norm


@subset_ce_loss.register_fake
def _(image_features, text_features, scale, labels, with_logits):
    loss, cos, row_max, row_log_sum, image_norm, text_norm = torch.ops.skipkernels.subset_logits_ce(
        image_features, text_features, scale, labels)
    logits = cos.new_empty(cos.shape if with_logits else (0,))
    return loss, logits, cos, row_max, row_log_sum, image_norm, text_norm


def _setup_context(ctx, inputs, output):
    image_features, text_features, scale, labels, with_logits = inputs
    _, _, cos, row_max, row_log_sum, image_norm, text_norm = output
    ctx.with_logits = with_logits
    # The saved statistics are not results to differentiate, and an output nobody used must come
    # back as None, not as a zero tensor built (and read by the kernel) on every step.
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(image_features, text_features, scale, labels, cos, row_max, row_log_sum,
                          image_norm, text_norm)


def _backward(ctx, grad_loss, grad_logits, *unused):
    image_features, text_features, scale, labels, cos, row_max, row_log_sum, image_norm, text_norm = \
        ctx.saved_tensors
    if not ctx.with_logits:
        grad_logits = None
    if grad_loss is None and grad_logits is None:
        return None, None, None, None, None
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=cos.dtype, device=cos.device)
    grad_image, grad_text, grad_scale = torch.ops.skipkernels.subset_logits_ce_backward(
        grad_loss, grad_logits, image_features, text_features, scale, labels, cos, row_max, row_log_sum,
        image_norm, text_norm)
    needs = ctx.needs_input_grad
    return (grad_image if needs[0] else None, grad_text if needs[1] else None,
            grad_scale if needs[2] else None, None, None)


subset_ce_loss.register_autograd(_backward, setup_context=_setup_context)


def apply(image_features, text_features, scale, labels, return_logits: bool = False):
    """Loss (0-d; float32, or float64 for float64 inputs) and, with ``return_logits``, the
    (B, K') logits ``scale * normalize(f) @ normalize(t).T``, both differentiable."""
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=image_features.device)
    elif scale.device != image_features.device:
        scale = scale.to(image_features.device)  # a CPU scalar with CUDA features: move it (tracked)
    loss, logits, *_ = subset_ce_loss(image_features, text_features, scale, labels, bool(return_logits))
    return (loss, logits) if return_logits else loss

