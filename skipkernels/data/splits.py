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
