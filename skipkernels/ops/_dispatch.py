"""Backend choice for every op.

Backends: ``torch`` (the pure-PyTorch reference, always available), ``triton``, ``cuda`` and
``cpu`` (compiled ops in ``skipkernels._C``). ``auto`` lets each op pick the fastest backend that
is available for the tensors it gets; an op only prefers a kernel over its reference where a
measurement says the kernel wins (see each op's ``_auto_backend``).
"""
from __future__ import annotations

import contextlib
import os

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
