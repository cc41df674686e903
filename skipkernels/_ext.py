"""Loads the compiled extension ``skipkernels._C`` and remembers why it did not load."""
from __future__ import annotations

import importlib

import torch

_C = None
load_error: str | None = None

try:
    _C = importlib.import_module("skipkernels._C")  # registers torch.ops.skipkernels.*
except ModuleNotFoundError:
    load_error = ("skipkernels._C is not built; the reference ops are used. Build it with "
                  "`pip install --no-build-isolation .` on a machine with a C++ compiler")
except ImportError as err:
    message = str(err)
    if "undefined symbol" in message:
        load_error = (f"skipkernels._C is stale (built against another torch than {torch.__version__}); "
                      f"rebuild with `pip install --no-build-isolation .`: {message}")
    else:
        load_error = f"skipkernels._C failed to load: {message}"


# What the extension holds cannot change within a process, so it is read once here: the op
# wrappers consult these constants inside code that torch.compile traces, where a call into the
# extension (pybind) or a registry probe would break the graph.
OP_NAMES = ("class_select", "subset_logits_ce", "subset_logits_ce_backward", "class_scores_topk")  # csrc/ops.cpp
COMPILED_OPS: frozenset[str] = frozenset(
    name for name in OP_NAMES if _C is not None and hasattr(torch.ops.skipkernels, name))
CUDA_BUILT: bool = _C is not None and bool(getattr(_C, "built_with_cuda", lambda: False)())


def has_op(name: str) -> bool:
    """True when ``torch.ops.skipkernels.<name>`` was registered by the compiled extension."""
    return name in COMPILED_OPS


def cuda_built() -> bool:
    return CUDA_BUILT


def _kind(device) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def has_kernel(name: str, device) -> bool:
    """True when the compiled op ``name`` has a kernel for tensors on ``device`` (cpu or cuda)."""
    kind = _kind(device)
    return name in COMPILED_OPS and (kind == "cpu" or (kind == "cuda" and CUDA_BUILT))


def use_compiled(name: str, backend: str, device) -> bool:
    """Whether op ``name`` runs its compiled kernel: always for backend 'cpu' / 'cuda' (which must
    match the tensors' device and be built), for 'auto' where built, never otherwise."""
    kind = _kind(device)
    if backend not in ("cpu", "cuda"):
        return backend == "auto" and has_kernel(name, kind)
    if backend != kind:
        raise ValueError(f"backend {backend!r} does not run on {kind} tensors")
    if not has_kernel(name, kind):
        raise RuntimeError(f"backend {backend!r} requested but the compiled {name} is unavailable for {kind}: "
                           f"{load_error or 'the extension was built without CUDA'}")
    return True


_CUDA_ERRORS = {
    1: "class_select got a label outside [0, C) (it was clamped)",
    2: "class_select found a selection whose size differs from num_selected (more distinct batch "
       "labels than top_k?); the output was truncated or padded",
    4: "subset_logits_ce got a label outside [0, K') (its loss term is NaN)",
}


def check_cuda_errors(device=None, reset: bool = True) -> None:
    """Raise ValueError when a CUDA op flagged bad input on ``device`` since the last check.

    The CUDA ops never synchronise in their static-size paths (so they can be graph-captured),
    hence they report bad data through a device-side error word instead of raising. This reads
    it, which synchronises the device: call it at checkpoints (e.g. once per epoch), not per step.
    """
    if not cuda_built() or not torch.cuda.is_available():
        return
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    bits = int(_C.cuda_error_flags(index, reset))
    if bits:
        problems = [text for bit, text in _CUDA_ERRORS.items() if bits & bit]
        raise ValueError(f"skipkernels CUDA ops on cuda:{index} flagged bad input: " + "; ".join(problems))


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _register_fakes() -> None:
    """Shapes and dtypes of the compiled ops for torch.compile / meta tensors (see csrc/ops.cpp)."""

    @torch.library.register_fake("skipkernels::class_select")
    def _class_select_fake(image_features, prototypes, labels, rank_mask, top_k, num_selected):
        if num_selected >= 0:
            size = num_selected
        else:
            size = torch.library.get_ctx().new_dynamic_size(min=top_k, max=prototypes.shape[0])
        return (image_features.new_empty((size,), dtype=torch.long),
                image_features.new_empty(labels.shape, dtype=torch.long))

    @torch.library.register_fake("skipkernels::subset_logits_ce")
    def _subset_logits_ce_fake(image_features, text_features, scale, labels):
        dtype = _compute_dtype(image_features, text_features)
        batch, classes = image_features.shape[0], text_features.shape[0]
        new = image_features.new_empty
        return (new((), dtype=dtype), new((batch, classes), dtype=dtype), new((batch,), dtype=dtype),
                new((batch,), dtype=dtype), new((batch,), dtype=dtype), new((classes,), dtype=dtype))

    @torch.library.register_fake("skipkernels::subset_logits_ce_backward")
    def _subset_logits_ce_backward_fake(grad_loss, grad_logits, image_features, text_features, scale, labels,
                                        cos, row_max, row_log_sum, image_norm, text_norm):
        return (image_features.new_empty(image_features.shape), text_features.new_empty(text_features.shape),
                scale.new_empty(scale.shape))

    @torch.library.register_fake("skipkernels::class_scores_topk")
    def _class_scores_topk_fake(image_features, text_features, scale, k, labels, chunk_size):
        k = min(k, text_features.shape[0])
        batch = image_features.shape[0]
        values = image_features.new_empty((batch, k), dtype=torch.float32)
        indices = image_features.new_empty((batch, k), dtype=torch.long)
        loss = image_features.new_empty((), dtype=torch.float32) if labels is not None else None
        return values, indices, loss


if COMPILED_OPS:
    _register_fakes()
