"""Backend choice for every op, and the one dispatch of the ops that have a Triton kernel.

Backends: ``torch`` (the pure-PyTorch reference, always available), ``triton``, ``cuda`` and
``cpu`` (compiled ops in ``skipkernels._C``). ``auto`` lets each op pick the fastest backend that
is available for the tensors it gets; an op only prefers a kernel over its reference where a
measurement says the kernel wins (see each op's ``_auto_backend``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from typing import Callable

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")

_current = os.environ.get("SKIPKERNELS_BACKEND", "auto")
if _current not in BACKENDS:
    raise ValueError(f"SKIPKERNELS_BACKEND={_current!r}; expected one of {BACKENDS}")


def get_backend() -> str:
    return _current


def set_backend(name: str) -> None:
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _current = name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed code with every op on backend ``name``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(backend: str | None) -> str:
    name = _current if backend is None else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_kernel_modules: dict = {}


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """An op's Triton kernel: ``skipkernels.triton.<module>.<entry>``, imported on first use.

    ``not_supported`` names a function of that module returning the reasons the kernel cannot
    run given inputs (empty: it can); such calls run the reference. Kernels never fall back
    themselves: they are leaves and import nothing from the op layer.
    """

    module: str
    entry: str
    not_supported: str | None = None

    def load(self):
        """The kernel module, or None where Triton cannot be imported. Imported once; later
        calls (also inside code torch.compile traces) only read ``_kernel_modules``."""
        if self.module not in _kernel_modules:
            try:
                _kernel_modules[self.module] = importlib.import_module(f"skipkernels.triton.{self.module}")
            except ImportError:
                _kernel_modules[self.module] = None
        return _kernel_modules[self.module]

    def reasons(self, module, *args, **kwargs) -> list[str]:
        return getattr(module, self.not_supported)(*args, **kwargs) if self.not_supported else []


def dispatch(kernel: TritonKernel, backend: str | None, prefers: Callable[[], bool], reference: Callable,
             *args, **kwargs):
    """Run ``kernel`` for backend 'triton', or for 'auto' where ``prefers()`` (a GPU measurement,
    see ops/measured.py) says it wins; ``reference(*args, **kwargs)`` otherwise and for the inputs
    the kernel does not support."""
    name = resolve(backend)
    if name == "triton" or (name == "auto" and prefers()):
        module = kernel.load()
        if module is None:
            raise RuntimeError(f"backend 'triton' requested but skipkernels.triton.{kernel.module} is unavailable")
        if not kernel.reasons(module, *args, **kwargs):
            return getattr(module, kernel.entry)(*args, **kwargs)
    return reference(*args, **kwargs)
