"""Loads the compiled ops for the running torch, and remembers where from or why not.

In order: the ``skipkernels._C`` built at install, if its build stamp (``_C.build.json``) says it
was built for this torch; otherwise a just-in-time build of the shipped sources (``_build``),
cached per torch/CUDA/architectures/sources and loaded in seconds by later processes, compiled
with ninja on first use (``load()``) under a lock that all ranks of a job share; otherwise nothing,
and the reference ops run. ``SKIPKERNELS_JIT=0`` turns the build on first use off.

``_C``, ``load_error``, ``COMPILED_OPS``, ``CUDA_BUILT`` and ``origin`` are resolved on first
access (which may compile) and are plain module constants from then on: the op wrappers read them
inside code that torch.compile traces, where a call into the extension would break the graph.
Entry points (``patch_clip``, ``SkipTuner``, the CLI) call ``load()`` before any tracing.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

from skipkernels import _build

_LAZY = ("_C", "load_error", "COMPILED_OPS", "CUDA_BUILT", "origin", "location")
_LOADED = False  # a plain flag, so the checks below trace under torch.compile once loaded


def __getattr__(name):
    if name in _LAZY:
        load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _installed() -> tuple[object | None, str | None, str | None]:
    """(module, its file, why not) for the ``skipkernels._C`` built at install."""
    try:
        spec = importlib.util.find_spec("skipkernels._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return None, None, "no skipkernels._C was built at install"
    stamp_file = Path(spec.origin).with_name(_build.STAMP)
    if stamp_file.is_file():
        try:
            why = _build.stamp_mismatch(json.loads(stamp_file.read_text()), torch)
        except (OSError, ValueError) as err:
            why = f"unreadable build stamp {stamp_file}: {err}"
        if why:
            return None, spec.origin, f"the installed skipkernels._C does not fit ({why})"
    try:
        return importlib.import_module("skipkernels._C"), spec.origin, None  # registers torch.ops.skipkernels.*
    except ImportError as err:
        message = str(err)
        if "undefined symbol" in message:
            return None, spec.origin, f"the installed skipkernels._C is stale (built against another torch than " \
                                      f"{torch.__version__}): {message}"
        return None, spec.origin, f"the installed skipkernels._C failed to load: {message}"


class _Plan:
    """Where the just-in-time build of the running torch lives, and whether it can run."""

    def __init__(self):
        self.root = _build.source_root()
        self.problem = None
        if os.environ.get("SKIPKERNELS_JIT", "1") == "0":
            self.problem = "compiling on first use is off (SKIPKERNELS_JIT=0)"
        elif self.root is None:
            self.problem = "the C++ sources (csrc/) are not shipped with this install"
        if self.problem:
            return  # nothing below is needed: load() reports the problem
        self.with_cuda, self.cuda_home, self.cuda_note = _build.cuda_plan(torch)
        self.arch = _build.cuda_arch_list(torch) if self.with_cuda else None
        self.dir = _build.cache_root() / "ops" / _build.build_key(torch, self.root, self.with_cuda, self.arch)
        self.what = f"CPU and CUDA (sm {self.arch}) ops" if self.with_cuda else "CPU ops"

    def module_file(self) -> Path | None:
        found = sorted(self.dir.glob(f"{_build.MODULE}*.so")) + sorted(self.dir.glob(f"{_build.MODULE}*.pyd"))
        return found[0] if found and (self.dir / "done.json").is_file() else None

    def failure(self) -> str | None:
        failed = self.dir / "failed.txt"
        return failed.read_text().strip() if failed.is_file() else None


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(_build.MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_build.MODULE] = module
    return module


def _say(message: str) -> None:
    print(f"skipkernels: {message}", file=sys.stderr, flush=True)


def _compile(plan: _Plan):
    """Build with ninja into ``plan.dir`` (torch's file lock there: one process builds, the others
    wait and load its result). Returns the module; raises RuntimeError with the reason."""
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    problem = _build.compiler_problem()
    if problem:
        raise RuntimeError(problem)
    plan.dir.mkdir(parents=True, exist_ok=True)
    sources = _build.cpu_sources(plan.root) + (_build.cuda_sources(plan.root) if plan.with_cuda else [])
    flags = _build.compile_flags(plan.with_cuda)
    saved_arch, saved_home = os.environ.get("TORCH_CUDA_ARCH_LIST"), cpp_extension.CUDA_HOME
    if plan.with_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch
        cpp_extension.CUDA_HOME = plan.cuda_home  # torch's own guess stops at nvcc's link, not the toolkit
    _say(f"compiling the {plan.what} for torch {torch.__version__} into {plan.dir} "
         "(once per torch and source version; about a minute) ...")
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=_build.MODULE, sources=[str(p) for p in sources], extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"], extra_ldflags=flags["ldflags"],
            extra_include_paths=[str(plan.root)], build_directory=str(plan.dir), verbose=False,
            with_cuda=plan.with_cuda)
    except Exception as err:  # the compiler's own output is in the message: keep it in the log
        (plan.dir / "build.log").write_text(f"{type(err).__name__}: {err}\n")
        first = next((line for line in str(err).splitlines() if "error" in line.lower()), str(err).splitlines()[0]
                     if str(err) else type(err).__name__)
        raise RuntimeError(f"the build failed ({first.strip()[:300]}); log: {plan.dir / 'build.log'}") from None
    finally:
        if saved_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
        cpp_extension.CUDA_HOME = saved_home
    seconds = time.perf_counter() - start
    _build.write_json(plan.dir / "done.json", {**_build.build_stamp(torch, plan.with_cuda, plan.arch),
                                              "seconds": round(seconds, 1)})
    _say(f"compiled the {plan.what} in {seconds:.0f} s")
    return module


def load(build: bool = True, force: bool = False) -> str | None:
    """Load the compiled ops once per process; returns ``load_error`` (None when they loaded).

    ``build=False`` loads only what is already built (``skipkernels info``); ``force`` retries a
    just-in-time build that failed before (``skipkernels build``)."""
    if _LOADED and (not force or globals()["_C"] is not None):  # a loaded module cannot be loaded twice
        return globals()["load_error"]
    module, where, installed_problem = _installed()
    origin, error = ("installed" if module is not None else None), None
    if module is None:
        plan = _Plan()
        if plan.problem:
            error = f"{installed_problem}; {plan.problem}"
        elif (cached := plan.module_file()) is not None:
            where = str(cached)
            try:
                module, origin = _import_file(cached), "cached"
            except ImportError as err:
                error = f"{installed_problem}; the cached build {where} failed to load: {err}"
        elif plan.failure() and not force:
            error = (f"{installed_problem}; compiling them failed before: {plan.failure()} "
                     "(`skipkernels build` retries)")
        elif not build:
            return f"{installed_problem}; compiled on first use into {plan.dir}"  # nothing loaded, nothing set
        else:
            try:
                module, origin, where = _compile(plan), "compiled", str(plan.dir)
                (plan.dir / "failed.txt").unlink(missing_ok=True)
            except RuntimeError as err:
                error = f"{installed_problem}; compiling them on first use failed: {err}"
                if plan.dir.is_dir():
                    (plan.dir / "failed.txt").write_text(str(err) + "\n")
            if error:
                _say(f"{error}. The reference ops run.")
    if error:
        error = error[0].upper() + error[1:] + ". The reference ops are used."
    _set(module, origin, where, error)
    return error


def _set(module, origin, where, error) -> None:
    global _LOADED
    compiled = frozenset(_registered_ops()) if module is not None else frozenset()
    globals().update(_C=module, origin=origin, location=where, load_error=error, COMPILED_OPS=compiled,
                     CUDA_BUILT=module is not None and bool(getattr(module, "built_with_cuda", lambda: False)()))
    _LOADED = True
    for register in _when_loaded:
        register()


def _registered_ops():
    """The ops csrc/ops.cpp registered: every ``skipkernels::`` op with a CPU kernel (the ops
    declared in Python, like ``subset_ce_loss``, have none of their own)."""
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("skipkernels::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"):
            yield name.split("::", 1)[1]


def status() -> dict:
    """Where the compiled ops come from, without compiling: {"state", "detail"}. The states:
    ``built at install``, ``built and cached``, ``compiled in this process``, ``compiled on first use``
    (nothing built yet; the first op that needs them compiles), ``unavailable``."""
    pending = load(build=False) if not _LOADED else None
    if not _LOADED:
        return {"state": "compiled on first use", "detail": pending}
    origin = globals()["origin"]
    state = {"installed": "built at install", "cached": "built and cached",
             "compiled": "compiled in this process", None: "unavailable"}[origin]
    return {"state": state, "detail": globals()["load_error"] if origin is None else globals()["location"]}


def _kind(device) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def has_kernel(name: str, device) -> bool:
    """True when the compiled op ``name`` has a kernel for tensors on ``device`` (cpu or cuda)."""
    if not _LOADED:
        load()
    kind = _kind(device)
    return name in COMPILED_OPS and (kind == "cpu" or (kind == "cuda" and CUDA_BUILT))


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
    if not _LOADED:
        load()
    if not CUDA_BUILT or not torch.cuda.is_available():
        return
    index = torch.cuda.current_device() if device is None else torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    bits = int(_C.cuda_error_flags(index, reset))
    if bits:
        problems = [text for bit, text in _CUDA_ERRORS.items() if bits & bit]
        raise ValueError(f"skipkernels CUDA ops on cuda:{index} flagged bad input: " + "; ".join(problems))


_when_loaded: list = []


def when_loaded(register) -> None:
    """Run ``register()`` whenever compiled ops are loaded (now, if they are): how each op declares
    the fake (meta) implementations of its compiled ops beside its declaration, registered before
    any torch.compile trace without importing the op layer here. ``register`` must be idempotent."""
    _when_loaded.append(register)
    if _LOADED:
        register()
