"""The package's version, and the versions a run or a benchmark records beside its results."""
from __future__ import annotations

__version__ = "0.1.0"  # as pyproject.toml's


def versions() -> dict:
    """skipkernels, torch, Python, CUDA, open_clip and Triton versions, and whether the compiled
    ops loaded: informative only, so a package that is missing is left out."""
    import platform

    import torch

    from skipkernels import _ext
    out = {"skipkernels": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "extension": _ext._C is not None}
    try:
        import open_clip
        out["open_clip"] = open_clip.__version__
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out
