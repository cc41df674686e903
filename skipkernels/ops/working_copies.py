"""Reading a block's GEMM weights through low-precision working copies instead of autocast's casts.

Under autocast every ``F.linear`` casts its fp32 weight and bias to the autocast dtype, at every
step, although a frozen weight never changes and a trained one changes only in the optimizer's
update. A training step that keeps working copies (``skipkernels.train.working_copies``) hands a
block plan the copies; ``read_through`` is how the plan uses them with autocast's maths:

- a frozen weight's copy is used as it is: the bf16 tensor autocast would have made;
- a trained weight's copy goes through ``_CopyOf``, whose forward returns the copy and whose
  backward is the cast's (the gradient cast back to the master's dtype, as autocast's
  ``ToCopyBackward``), so the fp32 master receives exactly the gradient it would have, and every
  hook, DDP bucket and optimizer on the masters sees no difference.

A copy is used only where it was made from the tensor the block reads now (``is``): a weight
computed at each read (a parametrisation such as LoRA on a packed in-projection) is not a
parameter, has no copy, and keeps autocast's cast.
"""
from __future__ import annotations

import torch


class _CopyOf(torch.autograd.Function):
    """``forward(count, *masters, *copies) -> copies``; the gradient of each copy reaches its
    master cast to the master's dtype (autocast's cast, moved out of the step)."""

    @staticmethod
    def forward(ctx, count, *tensors):
        ctx.set_materialize_grads(False)  # an output the block did not use gives its master nothing
        ctx.dtypes = [t.dtype for t in tensors[:count]]
        return tensors[count:]

    @staticmethod
    def backward(ctx, *grads):
        return (None, *[None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)],
                *[None] * len(grads))


def read_through(masters: tuple, working) -> tuple:
    """``masters`` (the tensors a block reads now, None where absent: each GEMM's weight then its
    bias) with each replaced by its working copy where ``working`` = (sources, copies) has one
    made from that very tensor. The copies of masters that require grad are linked to them one
    GEMM at a time: a GEMM's weight and bias gradients come out of the same backward, and each
    reaches its master (and the update inside backward) as soon as that GEMM's backward is done."""
    sources, copies = working
    out = list(masters)
    for first in range(0, len(masters), 2):
        linked_masters, linked_copies, positions = [], [], []
        for i in (first, first + 1):
            master, copy = masters[i], copies[i]
            if copy is None or master is not sources[i]:
                continue
            if master.requires_grad:
                linked_masters.append(master)
                linked_copies.append(copy)
                positions.append(i)
            else:
                out[i] = copy
        if positions:
            for i, linked in zip(positions, _CopyOf.apply(len(positions), *linked_masters, *linked_copies)):
                out[i] = linked
    return tuple(out)
