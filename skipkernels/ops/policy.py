"""KernelPolicy: which kernels the ops run, given once to ``patch_clip``, ``SkipTuner`` and the trainer.

    policy = KernelPolicy(backend="auto")                  # the default
    patch_clip(model, policy=policy)
    tuner = SkipTuner(model, classnames, tokenizer, config, policy=policy)

``backend``:
- ``auto``: each op picks, for the tensors it gets, a compiled op (``skipkernels._C``) where one is
  built for their device, and a Triton kernel only where ``table`` shows it beating the
  PyTorch reference on this GPU (see ops/measured.py); the reference otherwise.
- ``torch``: the PyTorch reference everywhere.
- ``triton``: every Triton kernel (an error where Triton cannot be imported); ops without a
  Triton kernel run their reference.
- ``cpu`` / ``cuda``: the compiled ops, which must be built for the tensors' device; the other ops
  run their reference.

``table``: where ``auto`` reads the measured wins: ``None`` is the table shipped with the package,
a path another table, and ``ALL_TRITON`` a table in which every Triton kernel wins on CUDA tensors
(the all-Triton path, to measure it end to end against the reference and the table's choice).

PyTorch's deterministic algorithms are the training's setting (``TrainConfig.deterministic``,
``deterministic_algorithms`` below), not the policy's: skipkernels' own kernels are deterministic
either way, as none accumulates results with atomics.

Ops take ``backend=`` as a policy or a backend name (shorthand for ``KernelPolicy(name)``); with
neither, the ambient policy applies, which is ``KernelPolicy()`` unless code runs inside
``use_policy(...)`` / ``use_backend(...)``. Nothing here reads the environment.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from skipkernels.options import option

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
ALL_TRITON = "all-triton"


# Each field's option() is also its command-line flag (skipkernels.options, skipkernels.cli).
@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    backend: str = option("auto", "which kernels the ops run: auto (compiled ops where built, Triton where "
                          "the measured table shows it winning), torch (the PyTorch references), triton, cpu "
                          "or cuda (the compiled ops)", choices=BACKENDS)
    table: str | None = option(None, f"the measured-wins table auto reads (default: the packaged one; "
                               f"{ALL_TRITON}: every Triton kernel)", flag="--kernel-table")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.table is not None:
            object.__setattr__(self, "table", str(self.table))

    def __deepcopy__(self, memo):
        # Immutable, so a copy is the very object: a deep-copied model or tuner still follows the
        # ambient policy by identity, and does not rebind its ops at its first call (inside a
        # torch.compile trace that rebinding would break the graph).
        return self


def check_runnable(policy: "KernelPolicy | str", device) -> None:
    """ValueError where ``policy``'s backend can never run on ``device``, so a run says so before it
    builds a model: ``triton`` without Triton, or on a CPU without ``TRITON_INTERPRET=1``; ``cpu`` /
    ``cuda`` on the other device or without their compiled ops. ``auto`` and ``torch`` always run."""
    import importlib.util

    from skipkernels import _ext
    from skipkernels.triton import interpreting
    backend = resolve(policy).backend
    kind = torch.device(device).type
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("backend 'triton' needs the triton package, which is not installed "
                             "(pip install triton); use backend 'auto' or 'torch'")
        if kind == "cpu" and not interpreting():
            raise ValueError("backend 'triton' on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1 "
                             "before starting (or run on a CUDA device); backend 'auto' runs everywhere")
    elif backend in ("cpu", "cuda"):
        if backend != kind:
            raise ValueError(f"backend {backend!r} runs the compiled ops on {backend} tensors, but the device is "
                             f"{kind}; use backend {kind!r} or 'auto'")
        if not _ext.COMPILED_OPS or (kind == "cuda" and not _ext.CUDA_BUILT):
            reason = _ext.load_error or "skipkernels._C was built without CUDA"
            raise ValueError(f"backend {backend!r} needs the compiled ops, which are not available: {reason}")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """PyTorch's deterministic algorithms (and no cuDNN autotuning) inside where ``enabled``; the
    previous settings are restored on exit. Nothing happens otherwise."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    # cuBLAS reads this when it creates a handle: a process that ran a GEMM on the GPU before keeps
    # its handle, so for bitwise-reproducible GPU GEMMs set it before the process's first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


# What ops accept as ``backend=``: a policy, a backend name, or None for the ambient policy.
Backend = "KernelPolicy | str | None"

# One policy object per backend name, so an op given a name builds nothing (also while
# torch.compile traces it).
_BY_NAME = {name: KernelPolicy(name) for name in BACKENDS}
_ambient = _BY_NAME["auto"]


def resolve(backend: "KernelPolicy | str | None") -> KernelPolicy:
    """The policy an op runs under: ``backend`` itself, the policy of that backend name, or the
    ambient one (None)."""
    if backend is None:
        return _ambient
    if isinstance(backend, KernelPolicy):
        return backend
    policy = _BY_NAME.get(backend)
    if policy is None:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return policy


def current_policy() -> KernelPolicy:
    return _ambient


@contextlib.contextmanager
def use_policy(policy: "KernelPolicy | str"):
    """Run the enclosed code with ``policy`` for every op not given one explicitly."""
    global _ambient
    previous, _ambient = _ambient, resolve(policy)
    try:
        yield _ambient
    finally:
        _ambient = previous


def use_backend(name: str):
    """``use_policy`` with only the backend changed."""
    return use_policy(dataclasses.replace(_ambient, backend=resolve(name).backend))
