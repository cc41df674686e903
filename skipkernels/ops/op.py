"""The op type: one declaration per op, naming its reference and every implementation it has.

    LINEAR_ACT = register(Op("linear_act", linear_act_reference, case=linear_act_case,
                             impls=(Triton("linear", "linear_act"),)))

An implementation is a ``Triton`` kernel (``skipkernels.triton.<module>.<entry>``) or a ``Compiled``
op of ``skipkernels._C``; each can say which inputs it does not support and why. ``OPS`` is the
one registry (``skipkernels info`` lists it). ``op.bind(policy)`` decides once what runs under a
``KernelPolicy`` and returns that callable; the block and tower plans hold it, so a training step
decides nothing again. ``op(*args, backend=...)`` binds (remembered per policy) and calls, for
code outside a plan.

Under a policy (ops/policy.py):
- ``torch``: the reference (or ``composed``: the op through its own sub-ops, each bound under
  the same policy, e.g. layer_norm_linear as layer_norm then linear_act);
- ``triton``: the Triton kernel; inputs it refuses raise ValueError with its reasons;
- ``cpu`` / ``cuda``: the compiled op, which must be built for the tensors' device;
- ``auto``: the compiled op where it is built for the tensors' device; the Triton kernel where
  the measured table (ops/measured.py) shows it winning for this call's case on this GPU and it
  supports the inputs; the reference (or ``composed``) otherwise. The decision is remembered per
  case: pass (forward, or forward and backward), compute dtype, the case's dims and row count.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch

from skipkernels import _ext
from skipkernels.ops import measured
from skipkernels.ops.policy import ALL_TRITON, KernelPolicy, resolve

_kernel_modules: dict = {}
_faked: set = set()  # compiled ops whose fake is registered (once per process)


@dataclasses.dataclass(frozen=True)
class Triton:
    """A Triton kernel ``skipkernels.triton.<module>.<entry>``, imported on first use. Kernels are
    leaves: they never fall back themselves. ``not_supported`` names a function of that module
    returning the reasons the kernel cannot take given inputs (empty: it can)."""

    module: str
    entry: str
    not_supported: str | None = None
    kind = "triton"

    def load(self):
        """The kernel module, or None where Triton cannot be imported."""
        if self.module not in _kernel_modules:
            try:
                _kernel_modules[self.module] = importlib.import_module(f"skipkernels.triton.{self.module}")
            except ImportError:
                _kernel_modules[self.module] = None
        return _kernel_modules[self.module]

    def unavailable(self, kind: str) -> str | None:
        if self.load() is None:
            return f"skipkernels.triton.{self.module} cannot be imported (is triton installed?)"
        return None

    def reasons(self, *args, **kwargs) -> list[str]:
        return getattr(self.load(), self.not_supported)(*args, **kwargs) if self.not_supported else []

    def function(self) -> Callable:
        return getattr(self.load(), self.entry)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled op, ``torch.ops.skipkernels.<name>``; ``call`` runs it with the op's arguments
    (the argument checks the compiled op does not make itself, then the op). ``fakes``: (name, fake)
    of every compiled op ``call`` runs: their shapes and dtypes for torch.compile and meta
    tensors, registered whenever the compiled ops load (``_ext.when_loaded``)."""

    name: str
    call: Callable
    fakes: tuple = ()
    kind = "compiled"

    def __post_init__(self):
        _ext.when_loaded(self.register_fakes)

    def register_fakes(self) -> None:
        for name, fake in self.fakes:
            if name in _ext.COMPILED_OPS and name not in _faked:
                # Registered on behalf of _ext, which always makes this call (when_loaded) and which
                # csrc/ops.cpp names as the module of the fakes (set_python_module).
                torch.library.register_fake(f"skipkernels::{name}", _stacklevel=2)(fake)
                _faked.add(name)

    def unavailable(self, kind: str) -> str | None:
        if _ext.has_kernel(self.name, kind):
            return None
        if self.name not in _ext.COMPILED_OPS:
            return f"the compiled {self.name} is not built: {_ext.load_error or 'missing from skipkernels._C'}"
        if kind == "cuda":
            return "skipkernels._C was built without CUDA"
        return f"compiled ops run on cpu and cuda tensors, not {kind}"

    def reasons(self, *args, **kwargs) -> list[str]:
        return []

    def function(self) -> Callable:
        return self.call


@dataclasses.dataclass(frozen=True, eq=False)
class Op:
    """An op: its ``reference`` (plain PyTorch, the oracle of every test), its ``impls``, and
    ``case(*args) -> (dims, rows)``, the measured table's key of a call (written once, read by
    dispatch and by the benchmarks). ``composed(policy)``: the op through its sub-ops where none
    of its own implementations runs (a function whose ``parts`` names the bound sub-ops).
    ``dtype(*args)``: the compute dtype to look up (default: the anchor's, or the autocast dtype).
    ``anchor``: the argument whose device decides (``x``; the PET gate's ``h``, as its ``x`` may
    be None)."""

    name: str
    reference: Callable
    case: Callable | None = None
    impls: tuple = ()
    composed: Callable | None = None
    dtype: Callable | None = None
    anchor: int = 0
    _bound: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def impl(self, kind: str):
        return next((i for i in self.impls if i.kind == kind), None)

    def __call__(self, *args, backend=None, **kwargs):
        policy = resolve(backend)
        bound = self._bound.get(policy)
        if bound is None:
            bound = self._bound[policy] = self.bind(policy)
        return bound(*args, **kwargs)

    def fallback(self, policy: KernelPolicy) -> Callable:
        return self.composed(policy) if self.composed is not None else self.reference

    def bind(self, policy: "KernelPolicy | str | None") -> Callable:
        """What runs for this op under ``policy``, decided once (see the module docstring)."""
        policy = resolve(policy)
        backend, fallback = policy.backend, self.fallback(policy)
        triton, compiled = self.impl("triton"), self.impl("compiled")
        if backend == "triton" and triton is not None:
            return _Forced(self, triton, "triton")
        if backend in ("cpu", "cuda") and compiled is not None:
            return _Forced(self, compiled, backend)
        if backend == "auto" and compiled is not None and compiled.unavailable("cpu") is None:
            kinds = frozenset(k for k in ("cpu", "cuda") if compiled.unavailable(k) is None)
            return _AutoCompiled(compiled.call, kinds, fallback, self.anchor)
        if backend == "auto" and triton is not None and (policy.table == ALL_TRITON or _has_entries(self, policy)):
            return _AutoTriton(self, triton, policy.table, fallback)
        return fallback

    def not_supported(self, kind: str, device_kind: str, *args, **kwargs) -> list[str]:
        """Why the implementation of ``kind`` cannot run these inputs on ``device_kind`` (empty: it can)."""
        impl = self.impl(kind)
        if impl is None:
            return [f"{self.name} has no {kind} implementation"]
        why = impl.unavailable(device_kind)
        return [why] if why else impl.reasons(*args, **kwargs)


def _has_entries(op: Op, policy: KernelPolicy) -> bool:
    # With no measurement of this op in the table, auto can only ever run the reference: bind it.
    return any(e["op"] == op.name for e in measured.entries(policy.table))


class _Forced:
    """A backend the user forced: it runs, or raises naming why it cannot."""

    __slots__ = ("op", "impl", "kind", "run")

    def __init__(self, op: Op, impl, kind: str):
        self.op, self.impl, self.kind, self.run = op, impl, kind, None

    def __call__(self, *args, **kwargs):
        device = args[self.op.anchor].device.type
        if self.kind in ("cpu", "cuda") and device != self.kind:
            raise ValueError(f"backend {self.kind!r} does not run on {device} tensors")
        reasons = self.op.not_supported(self.impl.kind, device, *args, **kwargs)
        if reasons:
            what = f"Triton {self.op.name} kernel" if self.impl.kind == "triton" else f"compiled {self.op.name} op"
            raise ValueError(f"backend {self.kind!r} was forced, but the {what} cannot run these inputs: "
                             f"{'; '.join(reasons)} (backend 'auto' runs the reference for them)")
        if self.run is None:
            self.run = self.impl.function()
        return self.run(*args, **kwargs)


class _AutoCompiled:
    """auto with a compiled op: it runs for tensors on a device it was built for."""

    __slots__ = ("call", "kinds", "fallback", "anchor")

    def __init__(self, call, kinds, fallback, anchor):
        self.call, self.kinds, self.fallback, self.anchor = call, kinds, fallback, anchor

    def __call__(self, *args, **kwargs):
        return (self.call if args[self.anchor].device.type in self.kinds else self.fallback)(*args, **kwargs)


class _AutoTriton:
    """auto with a Triton kernel: CPU tensors run the fallback; CUDA tensors the kernel where the
    table shows it winning for this case (decided once per case) and it supports the inputs."""

    __slots__ = ("op", "impl", "table", "fallback", "decisions", "kernel")

    def __init__(self, op: Op, impl: Triton, table, fallback):
        self.op, self.impl, self.table, self.fallback = op, impl, table, fallback
        self.decisions: dict = {}
        self.kernel = None

    def __call__(self, *args, **kwargs):
        x = args[self.op.anchor]
        if not x.is_cuda:
            return self.fallback(*args, **kwargs)
        backward = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
        dtype = self.op.dtype(*args) if self.op.dtype is not None else measured.compute_dtype(x)
        dims, rows = self.op.case(*args, **kwargs)
        key = (x.device.index, backward, dtype, tuple(dims), rows)
        wins = self.decisions.get(key)
        if wins is None:
            wins = self.decisions[key] = measured.prefers_triton(self.op.name, x, dims, rows, dtype=dtype,
                                                                 backward=backward, table=self.table)
        if wins and self.impl.load() is not None and not self.impl.reasons(*args, **kwargs):
            if self.kernel is None:
                self.kernel = self.impl.function()
            return self.kernel(*args, **kwargs)
        return self.fallback(*args, **kwargs)


def runs(bound) -> str:
    """What a bound op runs, in words (``print(tuner)``, ``skipkernels info --model``)."""
    if isinstance(bound, _Forced):
        return f"{bound.impl.kind} (forced)"
    if isinstance(bound, _AutoCompiled):
        return f"compiled on {'/'.join(sorted(bound.kinds))}, else {runs(bound.fallback)}"
    if isinstance(bound, _AutoTriton):
        return f"Triton where measured faster on this GPU, else {runs(bound.fallback)}"
    parts = getattr(bound, "parts", None)
    if parts is None:
        return "PyTorch reference"
    each = {name: runs(part) for name, part in parts.items()}
    if len(set(each.values())) == 1:
        return f"{' then '.join(each)}, each {next(iter(each.values()))}"
    return " then ".join(f"{name} ({how})" for name, how in each.items())


# The one registry of ops, by name (``register`` adds each op's declaration).
OPS: dict[str, Op] = {}


def _forget_bindings() -> None:
    for op in OPS.values():
        op._bound.clear()


measured.ON_REWRITE.append(_forget_bindings)


def register(op: Op) -> Op:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is declared twice")
    OPS[op.name] = op
    return op


def all_ops() -> dict[str, Op]:
    """Every op, each op module imported (so each declaration has run)."""
    import pkgutil

    import skipkernels.ops
    for info in pkgutil.iter_modules(skipkernels.ops.__path__):
        if not info.name.startswith("_") and info.name not in ("op", "policy", "measured", "block"):
            importlib.import_module(f"skipkernels.ops.{info.name}")
    return dict(sorted(OPS.items()))
