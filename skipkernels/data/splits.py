"""What every dataset reader returns: items, the train / val / test splits, and its error type."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Item:
    path: str
    label: int
    classname: str


class DatasetError(ValueError):
    """A dataset folder or split file that can't be used, with the path that is wrong."""


@dataclasses.dataclass
class Splits:
    name: str
    train: list[Item]
    val: list[Item]
    test: list[Item]
    classnames: list[str]  # indexed by label
    generated: bool = False  # drawn here from a plain image folder (see coop.write_split_json)


def name_lines(path, key: str) -> list[tuple[int, str, str]]:
    """(line number, key, class name) of each non-empty line ``<key> <class name>`` of a
    ``classnames.txt`` (``key``: what the first word is, for the message of a line without a name)."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        first, _, name = line.strip().partition(" ")
        if not name.strip():
            raise DatasetError(f"{path}:{n}: expected '<{key}> <class name>', got {line.strip()!r}")
        out.append((n, first, name.strip()))
    return out
