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

The optimizer update can run inside backward (``BackwardUpdate``): each trainable tensor gets the
optimizer's own SGD update as soon as its gradient is complete, and its gradient is freed at once,
so no full gradient buffer lives. It is bit-identical to ``optimizer.step()`` and on by default
where it can run (``choose_update``): eager and compiled steps, the protocol's SGD, one process.

Under autocast the eager and compiled steps keep bf16 working copies of the GEMM weights
(``train.working_copies``, ``choose_working_copies``): frozen ones cast once an epoch, trained ones
written by their update; bit-identical to autocast's per-step casts.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import types
import weakref

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach
from torch.optim.sgd import sgd

from skipkernels import _ext, distributed
from skipkernels.train.working_copies import WorkingCopies

STEP_KINDS = ("auto", "eager", "compiled", "graph")
UPDATE_MODES = ("auto", "on", "off")  # the optimizer update inside backward (BackwardUpdate)
WORKING_COPY_MODES = ("auto", "on", "off")  # working copies of the GEMM weights (train.working_copies)


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
    why = static_unavailable(tuner, batch_size)  # which also needs the compiled ops on the device
    if why:
        return f"the step has no static form: {why}"
    if not isinstance(optimizer, torch.optim.SGD) or any(g.get("dampening", 0) or g.get("nesterov")
                                                         for g in optimizer.param_groups):
        return "graph capture supports the protocol's SGD (momentum, weight decay, no dampening or Nesterov)"
    return None


def graph_memory_unavailable(trainable_bytes: int, left_bytes: int) -> str | None:
    """Why ``auto`` does not take the graph step on a card with ``left_bytes`` left for the steps
    (its memory less the weights, the optimizer state and the caches), or None. The graph step
    holds every trainable tensor's gradient from backward to its captured foreach update, whose
    temporaries copy them once more: twice the trainable bytes, which the compiled step (the
    update inside backward) never holds. Auto takes the graph only where that is at most half
    of what is left, so the activations keep the other half. ``skipkernels plan`` applies the same
    rule to its prediction."""
    extra = 2 * trainable_bytes
    if extra > left_bytes / 2:
        gib = 2 ** 30
        return (f"the graph step would hold {extra / gib:.1f} GiB of gradients and update temporaries, more than "
                f"half of the {max(left_bytes, 0) / gib:.1f} GiB left for the steps")
    return None


def optimizer_bytes(optimizer) -> int:
    """Bytes of the tensors ``optimizer`` updates (the trainable ones): one gradient buffer, or one
    momentum buffer, holds as many."""
    return sum(p.numel() * p.element_size() for group in optimizer.param_groups for p in group["params"])


def choose_step(requested: str, tuner, optimizer, batch_size: int, memory_left: int | None = None) -> StepChoice:
    """The step kind a run uses, decided once. A forced kind that cannot run raises ValueError
    naming why, before any training. ``memory_left``: bytes of the device left for the steps
    (``graph_memory_unavailable``); None: not weighed."""
    if requested not in STEP_KINDS:
        raise ValueError(f"step must be one of {STEP_KINDS}, got {requested!r}")
    why_not = {"eager": None, "compiled": compiled_unavailable(tuner, batch_size),
               "graph": graph_unavailable(tuner, optimizer, batch_size)}
    if requested != "auto":
        if why_not[requested]:
            raise StepUnavailable(f"step={requested!r} cannot run this training: {why_not[requested]}")
        return StepChoice(requested, "asked for")
    if why_not["graph"] is None and memory_left is not None:
        short = graph_memory_unavailable(optimizer_bytes(optimizer), memory_left)
        if short is not None and why_not["compiled"] is None:
            return StepChoice("compiled", f"graph is possible, but {short}")
    if why_not["graph"] is None:
        return StepChoice("graph", "CUDA, compiled CUDA ops, a fixed class-subset size and SGD")
    if tuner.device.type != "cuda":
        return StepChoice("eager", "on CPU compiling costs more than it saves in most runs; step='compiled' "
                          "asks for it")
    if why_not["compiled"] is None:
        return StepChoice("compiled", f"graph is not possible: {why_not['graph']}")
    return StepChoice("eager", f"graph and compiled are not possible: {why_not['compiled']}")


@dataclasses.dataclass(frozen=True)
class UpdateChoice:
    in_backward: bool
    reason: str

    def __str__(self) -> str:
        return f"{'in backward' if self.in_backward else 'after backward'} ({self.reason})"


def update_in_backward_unavailable(step_kind: str, optimizer) -> str | None:
    """Why the update cannot run inside backward exactly (or would save nothing), or None."""
    if type(optimizer) is not torch.optim.SGD:
        return (f"{type(optimizer).__name__} is not torch.optim.SGD: only SGD's update is known to be per tensor "
                "(another optimizer may need every gradient at once, e.g. for a global norm)")
    if any(g.get("differentiable") for g in optimizer.param_groups):
        return "a differentiable SGD keeps its update in the autograd graph"
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return "the optimizer has step hooks, which run only in optimizer.step()"
    if distributed.enabled():
        return ("under DistributedDataParallel a gradient is final only after its bucket's all-reduce, and DDP "
                "keeps full-size gradient buckets of its own, so an update in backward would save no memory")
    if step_kind == "graph":
        return ("the CUDA-graph step keeps its gradients as static tensors of the capture, so freeing them in "
                "backward saves nothing; optimizer.step() stays in the capture")
    return None


def _decide(setting: str, requested: str, why_not: str | None, on_reason: str) -> tuple[bool, str]:
    """An auto/on/off setting decided once: (on, why). "off" is off; auto is on unless ``why_not``;
    "on" where ``why_not`` stands raises StepUnavailable (a ValueError) naming it."""
    if requested not in UPDATE_MODES:  # WORKING_COPY_MODES are the same three
        raise ValueError(f"{setting} must be one of {UPDATE_MODES}, got {requested!r}")
    if requested == "off":
        return False, "asked for"
    if why_not is None:
        return True, on_reason
    if requested == "on":
        raise StepUnavailable(f"{setting}='on' cannot run this training: {why_not}")
    return False, why_not


def choose_update(requested: str, step_kind: str, optimizer) -> UpdateChoice:
    """Where the optimizer update runs, decided once (``_decide``)."""
    return UpdateChoice(*_decide("update_in_backward", requested, update_in_backward_unavailable(step_kind, optimizer),
                                 "SGD per tensor as each gradient completes; no gradient buffer"))


@dataclasses.dataclass(frozen=True)
class WorkingCopiesChoice:
    on: bool
    reason: str

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.reason})"


def working_copies_unavailable(step_kind: str, autocast_dtype) -> str | None:
    """Why a step of ``step_kind`` under ``autocast_dtype`` keeps no working copies, or None."""
    if autocast_dtype is None:
        return "no autocast: the step multiplies by the fp32 weights themselves, there is no cast to save"
    if step_kind == "graph":
        return ("the CUDA-graph step replays autocast's casts inside its capture (no launches to save), and its "
                "capture does not write copies")
    return None


def choose_working_copies(requested: str, step_kind: str, autocast_dtype) -> WorkingCopiesChoice:
    """Whether a step keeps working copies, decided once (``_decide``)."""
    why_not = working_copies_unavailable(step_kind, autocast_dtype)
    return WorkingCopiesChoice(*_decide("working_copies", requested, why_not,
                                        f"{str(autocast_dtype).removeprefix('torch.')} copies written by the update; "
                                        "frozen weights cast once an epoch"))


def _sgd_into_gradient(param, grad, buffers, group) -> None:
    """torch's single-tensor SGD (torch.optim.sgd._single_tensor_sgd), the same operations in the
    same order, written into the gradient it is about to free instead of new temporaries, and a
    first momentum buffer that takes the gradient's memory instead of a clone: the same bits, one
    tensor less at the peak."""
    if group["maximize"]:
        grad.neg_()
    if group["weight_decay"] != 0:
        grad.add_(param, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum != 0:
        if buffers[0] is None:
            # Nesterov goes on to write into grad; a gradient that is a view into a larger storage
            # (autograd may hand one over) would keep all of that storage alive as momentum
            owns_storage = grad.storage_offset() == 0 and \
                grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
            buffers[0] = grad if owns_storage and not group["nesterov"] else grad.clone()
        else:
            buffers[0].mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add_(buffers[0], alpha=momentum) if group["nesterov"] else buffers[0]
    param.add_(grad, alpha=-group["lr"])


def _update_hook(owner_ref, group_index, param):
    owner = owner_ref()
    if owner is not None:
        owner.update(group_index, param)


class BackwardUpdate:
    """The optimizer's SGD update of each parameter, run by a post-accumulate-grad hook during
    ``backward(loss)``: on that one tensor, the operations of the path ``optimizer.step()`` would
    take (torch's functional ``sgd`` for foreach and fused, ``_sgd_into_gradient`` for the
    single-tensor path), with its group's current hyperparameters and the momentum buffer in
    ``optimizer.state``. The update is elementwise, so it equals ``optimizer.step()`` bit for bit;
    the optimizer's state_dict (checkpoints, resume) is unchanged. Outside ``backward`` the hooks
    do nothing (another backward keeps its gradients for the caller)."""

    def __init__(self, optimizer, after_update=None):
        self.optimizer = optimizer
        self.after_update = after_update  # after_update(param): e.g. its working copy written from it
        self.enabled = False
        # the hooks hold only a weak reference, so a dropped step stops updating and unhooks
        self.handles = [p.register_post_accumulate_grad_hook(functools.partial(_update_hook, weakref.ref(self), i))
                        for i, group in enumerate(optimizer.param_groups) for p in group["params"]]

    def __del__(self):
        for handle in getattr(self, "handles", ()):
            handle.remove()

    def update(self, group_index: int, param) -> None:
        if not self.enabled or param.grad is None:
            return
        # read at each update: the schedule sets lr, and load_state_dict replaces groups and state
        group = self.optimizer.param_groups[group_index]
        grad = param.grad
        buffers = [self.optimizer.state[param].get("momentum_buffer")] if group["momentum"] != 0 else [None]
        foreach, fused = group["foreach"], group["fused"]
        if foreach is None and fused is None:  # the path optimizer.step() would take for this tensor
            fused, foreach = _default_to_fused_or_foreach([param], differentiable=False, use_fused=False)
        with torch.no_grad():
            if foreach or fused or grad.is_sparse or isinstance(group["lr"], torch.Tensor):
                sgd([param], [grad], buffers, weight_decay=group["weight_decay"], momentum=group["momentum"],
                    lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                    maximize=group["maximize"], has_sparse_grad=grad.is_sparse, foreach=foreach, fused=fused)
            else:
                _sgd_into_gradient(param, grad, buffers, group)
        if group["momentum"] != 0:
            self.optimizer.state[param]["momentum_buffer"] = buffers[0]
        param.grad = None
        if self.after_update is not None:
            self.after_update(param)

    def backward(self, loss) -> None:
        self.enabled = True
        try:
            loss.backward()
        finally:
            self.enabled = False


class EagerStep:
    """``loss = step(inputs, labels, weight)``: one update; the loss comes back on the device
    (detached, unweighted), so the caller reads losses back when it chooses.

    ``loss_module(inputs, labels)`` is the tuner's loss as a module (DDP may wrap it)."""

    kind = "eager"

    def __init__(self, tuner, optimizer, autocast_dtype, loss_module=None, update_in_backward: bool = False,
                 working_copies: bool = False):
        self.tuner, self.optimizer, self.autocast_dtype = tuner, optimizer, autocast_dtype
        self.loss_module = loss_module if loss_module is not None else tuner.loss
        self.device_type = tuner.device.type
        if working_copies and autocast_dtype is None:
            raise ValueError("working copies are copies in the autocast dtype: they need autocast")
        self.working_copies = WorkingCopies(tuner, autocast_dtype) if working_copies else None
        after_update = self.working_copies.updated if self.working_copies is not None else None
        self.backward_update = BackwardUpdate(optimizer, after_update) if update_in_backward else None

    def epoch_started(self) -> None:
        """The learning rates may have changed (a captured step reads them at capture)."""

    def epoch_ended(self) -> None:
        """The working copies are freed until the next step (the caching pass and evaluation
        between epochs do not hold them)."""
        if self.working_copies is not None:
            self.working_copies.release()

    def loss(self, inputs, labels):
        return self.loss_module(inputs, labels)

    def __call__(self, inputs, labels, weight: float = 1.0):
        working = self.working_copies
        try:
            if working is not None:
                working.attach()  # the blocks read the copies, each current with its master
            with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = self.loss(inputs, labels)
        finally:
            if working is not None:
                working.detach()  # anything else the model runs reads the masters
        self.optimizer.zero_grad(set_to_none=True)
        weighted = loss * weight if weight != 1.0 else loss
        if self.backward_update is not None:
            self.backward_update.backward(weighted)  # each tensor updated (and its copy), its gradient freed
        else:
            weighted.backward()
            self.optimizer.step()
            if working is not None:
                working.updated_all()
        return loss.detach()


def _own_code(function):
    """``function`` on a code object of its own. Dynamo keeps its compiled graphs, and its limit of
    recompiles, per code object; every step (another tuner, mode or model) traces a graph of its
    own, so steps sharing one code object made a process's ninth compiled step fail."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


class CompiledStep(EagerStep):
    """The static loss under torch.compile; labels must have been range-checked by the caller
    (the Trainer checks every training label at set-up), since the static step reads no values."""

    kind = "compiled"

    def __init__(self, tuner, optimizer, autocast_dtype, backend: str = "inductor", update_in_backward: bool = False,
                 working_copies: bool = False):
        super().__init__(tuner, optimizer, autocast_dtype, update_in_backward=update_in_backward,
                         working_copies=working_copies)
        # Dynamo logs every recompile (a smaller last batch is one) at WARNING level.
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        self.compiled_loss = torch.compile(_own_code(lambda x, y: tuner.loss(x, y, static=True)), fullgraph=True,
                                           backend=backend)

    def loss(self, inputs, labels):
        self.tuner.towers.follow_ambient()  # ops bound now, never inside the trace
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
            self.tuner.towers.follow_ambient()  # ops bound now, never inside the capture
            self.captured = CapturedStep(self.tuner, self.optimizer, inputs, labels, self.autocast_dtype,
                                         check_labels=False)
            self.captured_lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.captures += 1
        if inputs.shape == self.captured.inputs.shape and labels.shape == self.captured.labels.shape:
            return self.captured(inputs, labels, check_labels=False).clone()
        return self.captured.eager_step(inputs, labels)  # a fresh tensor: no clone


def make_step(choice: StepChoice, tuner, optimizer, autocast_dtype, loss_module=None,
              update: UpdateChoice | None = None, working: WorkingCopiesChoice | None = None):
    in_backward = update is not None and update.in_backward
    copies = working is not None and working.on
    if choice.kind == "graph":  # choose_update and choose_working_copies keep both off for it
        return GraphStep(tuner, optimizer, autocast_dtype)
    if choice.kind == "compiled":
        return CompiledStep(tuner, optimizer, autocast_dtype, update_in_backward=in_backward, working_copies=copies)
    return EagerStep(tuner, optimizer, autocast_dtype, loss_module, update_in_backward=in_backward,
                     working_copies=copies)
