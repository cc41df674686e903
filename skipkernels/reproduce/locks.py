"""A run of a sweep is claimed with a lock file, so processes sharing one output folder (shards,
or the same sweep started twice) never train the same run at once.

The lock is created with ``O_CREAT | O_EXCL`` (atomic on a local file system and on NFSv3+) and
records the owner's host and pid. A lock whose owner is on this host and no longer alive (a
process killed before it could remove it) is stale: it is taken over by renaming it away first, so
of two processes that find the same stale lock only one takes it. A lock held from another host is
respected; its message says how to remove it when that process is gone.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_owner(path: Path) -> dict | None:
    """The owner recorded in lock ``path``; {} when it cannot be read (being written); None when absent."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def is_stale(owner: dict | None) -> bool:
    """The owner is a process of this host that is gone."""
    return bool(owner) and owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
        and not _alive(owner["pid"])


class RunLock:
    """``claim()`` takes the lock of folder ``folder`` or says who holds it; ``release()`` (or the
    with block's end) removes it, if it is still this process's."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self.held = False
        self.took_stale: dict | None = None  # the stale owner this claim replaced

    def claim(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = read_owner(self.path)
                if not is_stale(owner):
                    return False
                aside = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)  # only one process wins the rename
                except FileNotFoundError:
                    continue
                if not is_stale(read_owner(aside)):  # a fresh lock was renamed: put it back
                    try:
                        os.link(aside, self.path)
                    except FileExistsError:
                        pass
                    aside.unlink(missing_ok=True)
                    return False
                aside.unlink(missing_ok=True)
                self.took_stale = owner
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.owner, f)
            self.held = True
            return True
        return False

    def holder(self) -> str:
        owner = read_owner(self.path) or {}
        return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}"

    def release(self) -> None:
        if self.held and read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
