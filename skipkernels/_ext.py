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


def has_op(name: str) -> bool:
    """True when ``torch.ops.skipkernels.<name>`` was registered by the compiled extension."""
    if _C is None:
        return False
    return hasattr(torch.ops.skipkernels, name)


def cuda_built() -> bool:
    return _C is not None and bool(getattr(_C, "built_with_cuda", lambda: False)())
