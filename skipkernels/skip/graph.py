"""A whole Skip Tuning training step (forward, backward, optimizer step) captured in a CUDA graph.

At the paper's batch 4 a step is a few hundred small kernels: launch overhead dominates, and
replaying one graph removes it. Capture needs a step without host synchronisation: the tuner's
``static`` step (fixed CSkip subset size, text truncated to the longest prompt of all classes)
with the compiled, sync-free ``class_select`` and ``subset_logits_ce`` ops.
"""
from __future__ import annotations

import torch

from skipkernels import _ext


class CapturedStep:
    """``step = CapturedStep(tuner, optimizer, example_inputs, example_labels)``, then
    ``loss = step(inputs, labels)`` copies the batch into static buffers and replays the graph."""

    def __init__(self, tuner, optimizer, example_inputs, example_labels, autocast_dtype=torch.bfloat16,
                 warmup_steps: int = 3, check_labels: bool = True):
        if tuner.device.type != "cuda":
            raise RuntimeError("CUDA graph capture needs the tuner on a CUDA device")
        if not (_ext.has_kernel("class_select", "cuda") and _ext.has_kernel("subset_logits_ce", "cuda")):
            raise RuntimeError(f"CUDA graph capture needs the compiled CUDA ops: {_ext.load_error or 'not built'}")
        if tuner.skipper is not None:
            if tuner.skipper.resample != "fixed" or example_labels.shape[0] > tuner.skipper.top_k:
                raise ValueError("capture needs a fixed CSkip subset size: resample='fixed' and batch <= top_k")
        if not isinstance(optimizer, torch.optim.SGD) or any(g.get("dampening", 0) for g in optimizer.param_groups):
            raise ValueError("CapturedStep supports SGD without dampening (the protocol's optimizer): its "
                             "warm-up can be undone exactly")
        self.tuner, self.optimizer, self.autocast_dtype = tuner, optimizer, autocast_dtype
        self.inputs = example_inputs.detach().clone()
        self.labels = example_labels.detach().clone().to(tuner.device)
        if check_labels:
            tuner.check_labels(example_labels)
        params = [p for _, p in tuner.trainable_named_parameters()]
        saved = [p.detach().clone() for p in params]
        # An optimizer that has stepped (a capture after a learning-rate change, or after a
        # resume) keeps its momentum: the warm-up's changes to it are undone from this copy.
        saved_momentum = {p: optimizer.state[p]["momentum_buffer"].clone() for p in params
                          if optimizer.state.get(p, {}).get("momentum_buffer") is not None}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up creates optimizer state and autotunes outside capture
            for _ in range(warmup_steps):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        # Undo the warm-up so the first replay is the run's next step: weights back, and momentum
        # buffers back to what they held, or zeroed where there were none, which for SGD
        # (dampening 0) is exactly "no buffer yet" (buf = grad).
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
            for p in params:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if p in saved_momentum:
                    buf.copy_(saved_momentum[p])
                elif buf is not None:
                    buf.zero_()
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = self._step()

    def _step(self, inputs=None, labels=None):
        """One static step on the capture's buffers, or eagerly on ``inputs``/``labels`` of another
        shape (an epoch's smaller last batch). Gradients are zeroed, not freed: the graph reads them."""
        self.optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            loss = self.tuner.loss(self.inputs if inputs is None else inputs,
                                   self.labels if labels is None else labels, static=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def eager_step(self, inputs, labels):
        return self._step(inputs, labels.to(self.tuner.device))

    def __call__(self, inputs, labels, check_labels: bool = True):
        if check_labels:
            self.tuner.check_labels(labels)  # checked here, outside the graph
        self.inputs.copy_(inputs, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.loss
