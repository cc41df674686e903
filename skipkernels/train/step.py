"""One training step (forward, backward, optimizer update) of a tuner, in one of three kinds. The
Trainer and ``skipkernels bench`` run the same objects, so a benchmarked step is one ``finetune`` runs.

- ``eager``: the tuner's loss as written, then ``backward`` and ``optimizer.step()``. CSkip's
  subset size and the text truncation follow each batch; both read values back to the host.
- ``compiled``: the tuner's static loss (fixed subset size, text truncated to the longest prompt
  of all classes: no host synchronisation) under ``torch.compile(fullgraph=True)``; the optimizer
  update stays eager.
- ``graph``: the whole static step, optimizer update included, captured in a CUDA graph
  (``skip.graph.CapturedStep``) and replayed. The learning rate is part of the capture, so the
  step is captured again whenever it changes (once an epoch under the protocol's schedule).

``auto`` decides once, at set-up (``choose_step``): graph where its conditions hold, else compiled
on CUDA where the static step traces, else eager. On CPU ``auto`` is eager: compiling costs about
a minute on a small model for a gain of about a quarter of its step (bench/NOTES.md), so it pays
only in long runs; ask for it with ``step="compiled"``.

The compiled and graph kinds compute the same maths as eager within fp32 rounding: the static
step truncates text to the longest prompt of all classes, not of the step's subset (exact under
causal attention, but another summation length), and inductor fuses differently.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from skipkernels import _ext, distributed

STEP_KINDS = ("auto", "eager", "compiled", "graph")


class StepUnavailable(ValueError):
    """A step kind asked for cannot run this training; the message says why."""


@dataclasses.dataclass(frozen=True)
class StepChoice:
    kind: str    # eager, compiled or graph
    reason: str  # why: what auto saw, or "asked for"

    def __str__(self) -> str:
        return f"{self.kind} ({self.reason})"


def static_unavailable(tuner, batch_size: int) -> str | None:
    """Why the tuner's static step (fixed shapes, no host synchronisation) cannot run, or None."""
    skipper = tuner.skipper
    if skipper is not None and skipper.enabled:
        if skipper.resample != "fixed":
            return "CSkip redraws its rank mask every step (resample='step'), so the subset size changes"
        if batch_size > skipper.top_k:
            return (f"a batch of {batch_size} can hold more than K = {skipper.top_k} distinct labels, so the "
                    "CSkip subset size is not fixed")
    if distributed.enabled():
        return "under torch.distributed the class subset is chosen over the all-gathered batch (a host read)"
    # The PyTorch references of the loss and of CSkip's selection check label values and size
    # their output from the data; the compiled ops take both as given (the caller checked them).
    kind = tuner.device.type
    ops = ["subset_logits_ce"] + (["class_select"] if skipper is not None and skipper.enabled else [])
    missing = [op for op in ops if not _ext.has_kernel(op, kind)]
    if missing:
        return f"it needs the compiled {' and '.join(missing)} ops on {kind}: {_ext.load_error or 'not built'}"
    backend = tuner.bound_policy.backend
    if backend not in ("auto", kind):
        return f"it needs the compiled {' and '.join(ops)} ops, which kernel backend {backend!r} does not run"
    return None


def compiled_unavailable(tuner, batch_size: int) -> str | None:
    why = static_unavailable(tuner, batch_size)
    return f"the step has no static form: {why}" if why else None


def graph_unavailable(tuner, optimizer, batch_size: int) -> str | None:
    if tuner.device.type != "cuda":
        return "graph capture needs a CUDA device"
    missing = [op for op in ("class_select", "subset_logits_ce") if not _ext.has_kernel(op, "cuda")]
    if missing:
        return f"graph capture needs the compiled CUDA ops ({', '.join(missing)}): {_ext.load_error or 'not built'}"
    why = static_unavailable(tuner, batch_size)
    if why:
        return f"the step has no static form: {why}"
    if not isinstance(optimizer, torch.optim.SGD) or any(g.get("dampening", 0) or g.get("nesterov")
                                                         for g in optimizer.param_groups):
        return "graph capture supports the protocol's SGD (momentum, weight decay, no dampening or Nesterov)"
    return None


def choose_step(requested: str, tuner, optimizer, batch_size: int) -> StepChoice:
    """The step kind a run uses, decided once. A forced kind that cannot run raises ValueError
    naming why, before any training."""
    if requested not in STEP_KINDS:
        raise ValueError(f"step must be one of {STEP_KINDS}, got {requested!r}")
    why_not = {"eager": None, "compiled": compiled_unavailable(tuner, batch_size),
               "graph": graph_unavailable(tuner, optimizer, batch_size)}
    if requested != "auto":
        if why_not[requested]:
            raise StepUnavailable(f"step={requested!r} cannot run this training: {why_not[requested]}")
        return StepChoice(requested, "asked for")
    if why_not["graph"] is None:
        return StepChoice("graph", "CUDA, compiled CUDA ops, a fixed class-subset size and SGD")
    if tuner.device.type != "cuda":
        return StepChoice("eager", "on CPU compiling costs more than it saves in most runs; step='compiled' "
                          "asks for it")
    if why_not["compiled"] is None:
        return StepChoice("compiled", f"graph is not possible: {why_not['graph']}")
    return StepChoice("eager", f"graph and compiled are not possible: {why_not['compiled']}")


class EagerStep:
    """``loss = step(inputs, labels, weight)``: one update; the loss comes back on the device
    (detached, unweighted), so the caller reads losses back when it chooses.

    ``loss_module(inputs, labels)`` is the tuner's loss as a module (DDP may wrap it)."""

    kind = "eager"

    def __init__(self, tuner, optimizer, autocast_dtype, loss_module=None):
        self.tuner, self.optimizer, self.autocast_dtype = tuner, optimizer, autocast_dtype
        self.loss_module = loss_module if loss_module is not None else tuner.loss
        self.device_type = tuner.device.type

    def epoch_started(self) -> None:
        """The learning rates may have changed (a captured step reads them at capture)."""

    def loss(self, inputs, labels):
        return self.loss_module(inputs, labels)

    def __call__(self, inputs, labels, weight: float = 1.0):
        with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        self.optimizer.step()
        return loss.detach()


class CompiledStep(EagerStep):
    """The static loss under torch.compile; labels must have been range-checked by the caller
    (the Trainer checks every training label at set-up), since the static step reads no values."""

    kind = "compiled"

    def __init__(self, tuner, optimizer, autocast_dtype, backend: str = "inductor"):
        super().__init__(tuner, optimizer, autocast_dtype)
        # Dynamo logs every recompile (a smaller last batch is one) at WARNING level.
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        self.compiled_loss = torch.compile(lambda x, y: tuner.loss(x, y, static=True), fullgraph=True,
                                           backend=backend)

    def loss(self, inputs, labels):
        self.tuner.towers.refresh()  # plans rebuilt now, never inside the trace
        return self.compiled_loss(inputs, labels.to(self.tuner.device, non_blocking=True))


class GraphStep(EagerStep):
    """The whole static step in a CUDA graph, captured at the first step after each learning-rate
    change and replayed for every batch of the captured shape. A batch of another shape (an
    epoch's smaller last batch) runs the same static step eagerly on the same tensors."""

    kind = "graph"

    def __init__(self, tuner, optimizer, autocast_dtype):
        super().__init__(tuner, optimizer, autocast_dtype)
        self.captured = None
        self.captures = 0

    def epoch_started(self) -> None:
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        if self.captured is not None and lrs != self.captured_lrs:
            self.captured = None  # captured again at the next step, with the new rates

    def __call__(self, inputs, labels, weight: float = 1.0):
        from skipkernels.skip.graph import CapturedStep
        labels = labels.to(self.tuner.device, non_blocking=True)
        if self.captured is None:
            self.tuner.towers.refresh()  # plans rebuilt now, never inside the capture
            self.captured = CapturedStep(self.tuner, self.optimizer, inputs, labels, self.autocast_dtype,
                                         check_labels=False)
            self.captured_lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.captures += 1
        if inputs.shape == self.captured.inputs.shape and labels.shape == self.captured.labels.shape:
            return self.captured(inputs, labels, check_labels=False).clone()
        return self.captured.eager_step(inputs, labels).clone()


def make_step(choice: StepChoice, tuner, optimizer, autocast_dtype, loss_module=None):
    if choice.kind == "graph":
        return GraphStep(tuner, optimizer, autocast_dtype)
    if choice.kind == "compiled":
        return CompiledStep(tuner, optimizer, autocast_dtype)
    return EagerStep(tuner, optimizer, autocast_dtype, loss_module)
