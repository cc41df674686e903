"""What is available: torch, CUDA, Triton, which compiled ops loaded and why not."""
from __future__ import annotations

import importlib
import platform

import torch

from skipkernels import _ext


def registered_ops() -> dict:
    """Every op (``skipkernels.ops.op.OPS``, the one registry) by name."""
    from skipkernels.ops.op import all_ops
    return all_ops()


def triton_kernels() -> dict:
    """The Triton implementation of every op that has one, by op name."""
    return {name: op.impl("triton") for name, op in registered_ops().items() if op.impl("triton") is not None}


def _triton_status():
    try:
        triton = importlib.import_module("triton")
    except ImportError as err:
        return None, f"not installed ({err})"
    import os
    if torch.cuda.is_available():
        return triton.__version__, "GPU kernels"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton.__version__, "interpreter on CPU (TRITON_INTERPRET=1)"
    return triton.__version__, "installed, but no GPU: Triton kernels need a GPU or TRITON_INTERPRET=1"


def _triton_ops(usable: bool, device: str) -> dict:
    """Per Triton op: can it run here, and where does ``auto`` pick it (measured wins)?"""
    from skipkernels.ops import measured
    entries = [e for e in measured.entries(None) if e["device"] == device]
    ops = {}
    for op, kernel in triton_kernels().items():
        if not usable:
            status = "needs a GPU (or TRITON_INTERPRET=1 on CPU)"
        else:
            try:
                importlib.import_module(f"skipkernels.triton.{kernel.module}")
                status = "available"
            except Exception as err:  # report why, as for the compiled ops
                status = f"not loaded: {type(err).__name__}: {err}"
        mine = [e for e in entries if e["op"] == op]
        wins = sum(e["speedup"] >= measured.MIN_SPEEDUP for e in mine)
        auto = (f"auto: Triton at {wins} of {len(mine)} measured shapes" if mine
                else "auto: reference (no measurement on this device)")
        ops[op] = f"{status}; {auto}"
    return ops


def collect() -> dict:
    triton_version, triton_note = _triton_status()
    state = _ext.status()  # never compiles: a build not made yet says so
    loaded = state["state"] not in ("compiled on first use", "unavailable")
    ops = {}
    for name in (n for n, op in registered_ops().items() if op.impl("compiled") is not None):
        if loaded and name in _ext.COMPILED_OPS:
            ops[name] = f"{'cuda+cpu' if _ext.CUDA_BUILT else 'cpu'} ({state['state']})"
        elif loaded:
            ops[name] = f"unavailable: missing from the extension at {state['detail']}"
        else:
            ops[name] = f"{state['state']}: {state['detail']}"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    triton_usable = triton_version is not None and "no GPU" not in triton_note
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
        "triton": triton_version,
        "triton_status": triton_note,
        "extension": f"{state['state']} ({state['detail']})",
        "extension_cuda": loaded and _ext.CUDA_BUILT,
        "compiled_ops": ops,
        "triton_ops": _triton_ops(triton_usable, device) if triton_version is not None else {},
    }


def info(file=None) -> dict:
    """Print and return what skipkernels can use on this machine."""
    data = collect()
    lines = [f"skipkernels on {data['device']}",
             f"  python {data['python']}, torch {data['torch']} (CUDA {data['torch_cuda']}, "
             f"available: {data['cuda_available']})",
             f"  triton: {data['triton'] or '-'} - {data['triton_status']}",
             f"  compiled ops: {data['extension']}; CUDA ops built: {data['extension_cuda']}"]
    for name, status in data["compiled_ops"].items():
        lines.append(f"    {name:28s} {status}")
    if data["triton_ops"]:
        lines.append("  Triton ops:")
        for name, status in data["triton_ops"].items():
            lines.append(f"    {name:28s} {status}")
    print("\n".join(lines), file=file)
    return data
