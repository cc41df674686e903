"""The one dispatch of the ops that have a Triton kernel, under a ``KernelPolicy`` (ops/policy.py).

Backends: ``torch`` (the pure-PyTorch reference, always available), ``triton``, ``cuda`` and
``cpu`` (compiled ops in ``skipkernels._C``). ``auto`` lets each op pick the fastest backend that
is available for the tensors it gets; an op only prefers a Triton kernel over its reference where
the policy's measured table says the kernel wins (see ops/measured.py).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from skipkernels import _ext
from skipkernels.ops.policy import resolve


_kernel_modules: dict = {}


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """An op's Triton kernel: ``skipkernels.triton.<module>.<entry>``, imported on first use.

    ``op``: the op's name, under which the measured table and ``skipkernels info`` know it (the
    entry's name unless given). Declared once, at module level in the op's file: that is the
    registry (``skipkernels.info.triton_kernels`` collects the declarations). ``not_supported``
    names a function of that module returning the reasons the kernel cannot run given inputs
    (empty: it can); such calls run the reference. Kernels never fall back themselves: they are
    leaves and import nothing from the op layer.
    """

    module: str
    entry: str
    not_supported: str | None = None
    op: str = ""

    def __post_init__(self):
        if not self.op:
            object.__setattr__(self, "op", self.entry)

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


def dispatch(kernel: TritonKernel, backend, prefers: Callable[[str | None], bool], reference: Callable,
             *args, **kwargs):
    """Run ``kernel`` for backend 'triton', or for 'auto' where ``prefers(table)`` (a GPU
    measurement in the policy's table, see ops/measured.py) says it wins; ``reference(*args,
    **kwargs)`` otherwise. Inputs the kernel does not support run the reference under 'auto';
    under a forced 'triton' they raise ValueError with the kernel's reasons (whoever forced the
    kernel expects it to run, or to be told). ``backend``: a KernelPolicy, a backend name or None
    (the ambient policy)."""
    chosen = resolve(backend)
    name = chosen.backend
    if name == "triton" or (name == "auto" and prefers(chosen.table)):
        module = kernel.load()
        if module is None:
            raise RuntimeError(f"backend 'triton' requested but skipkernels.triton.{kernel.module} is unavailable")
        reasons = kernel.reasons(module, *args, **kwargs)
        if not reasons:
            return getattr(module, kernel.entry)(*args, **kwargs)
        if name == "triton":
            raise ValueError(f"backend 'triton' was forced, but the Triton {kernel.op} kernel does not support "
                             f"these inputs: {'; '.join(reasons)} (backend 'auto' runs the reference for them)")
    return reference(*args, **kwargs)


def use_compiled(op: str, backend, device) -> bool:
    """Whether the compiled op ``op`` runs for tensors on ``device`` under ``backend`` (a policy, a
    name or None): see ``_ext.use_compiled``."""
    return _ext.use_compiled(op, resolve(backend).backend, device)
