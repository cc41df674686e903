"""Checkpoints and run files written atomically (a temporary file in the same folder, then a rename)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch

from skipkernels.errors import CheckpointError


def _atomic_write(path: str | os.PathLike, write) -> None:
    """``write(f)`` into a temporary file beside ``path``, then rename it onto ``path``: a reader
    sees the old file or the whole new one. The file gets the user's umask, as open() gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """``text`` (UTF-8) to ``path``, atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load(path: str | os.PathLike, mmap: bool = False):
    """A checkpoint's contents on the CPU; ``mmap``: tensors are read only when touched."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def check_signature(saved: dict, expected: dict, path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {v!r}" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from another model or configuration: " + "; ".join(diffs))
