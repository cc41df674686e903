"""Autograd for the compiled class-subset logits + cross-entropy ops.

``apply(image_features, text_features, scale, labels, return_logits)`` computes the same values as
``subset_logits_ce_reference`` with ``torch.ops.skipkernels.subset_logits_ce`` forward and
``torch.ops.skipkernels.subset_logits_ce_backward`` backward (schemas in csrc/ops.cpp). Saved for
backward: the inputs plus cos (B, K'), the row log-sum-exp (as max and log-sum, (B,) each) and the
row norms; nothing larger
than (B, K') is kept. Gradients flow to image_features, text_features and scale (first order only).
"""
from __future__ import annotations

import torch


class SubsetLogitsCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_features, text_features, scale, labels, return_logits):
        loss, cos, row_max, row_log_sum, image_norm, text_norm = torch.ops.skipkernels.subset_logits_ce(
            image_features, text_features, scale, labels)
        ctx.save_for_backward(image_features, text_features, scale, labels, cos, row_max, row_log_sum,
                              image_norm, text_norm)
        # Unused outputs get no gradient tensor at all (no zeros to build and add).
        ctx.set_materialize_grads(False)
        if return_logits:
            return loss, scale.to(cos.dtype) * cos
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_logits=None):
        image_features, text_features, scale, labels, cos, row_max, row_log_sum, image_norm, text_norm = \
            ctx.saved_tensors
        if grad_loss is None and grad_logits is None:
            return None, None, None, None, None
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=cos.dtype, device=cos.device)
        grad_image, grad_text, grad_scale = torch.ops.skipkernels.subset_logits_ce_backward(
            grad_loss, grad_logits, image_features, text_features, scale, labels, cos, row_max,
            row_log_sum, image_norm, text_norm)
        needs = ctx.needs_input_grad
        return (grad_image if needs[0] else None, grad_text if needs[1] else None,
                grad_scale if needs[2] else None, None, None)


def apply(image_features, text_features, scale, labels, return_logits: bool = False):
    """Loss (0-d; float32, or float64 for float64 inputs) and, with ``return_logits``, the
    (B, K') logits ``scale * normalize(f) @ normalize(t).T``, both differentiable."""
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=image_features.device)
    elif scale.device != image_features.device:
        scale = scale.to(image_features.device)  # a CPU scalar with CUDA features: move it (tracked)
    return SubsetLogitsCE.apply(image_features, text_features, scale, labels, bool(return_logits))
