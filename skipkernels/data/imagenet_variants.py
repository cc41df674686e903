"""ImageNet's test-only variants in CoOp's DATASETS.md layouts: ImageNet-V2, -Sketch, -A and -R.

Each folder holds a copy of ImageNet's ``classnames.txt`` (lines ``<wnid> <class name>`` in
ImageNet's label order) beside its images:

- ``imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/``: one folder per ImageNet label;
- ``imagenet-sketch/images/<wnid>/``;
- ``imagenet-adversarial/imagenet-a/<wnid>/`` and ``imagenet-rendition/imagenet-r/<wnid>/``: the 200
  classes of each subset.

As in CoOp's readers, the classes are the class folders present, in ImageNet's label order (for
-A and -R, a subset of 200), labelled 0..C-1, each named by ``classnames.txt``. The subsets of -A
and -R ship as data (``imagenet_subsets.json``: their indices into ImageNet's 1000 labels, from
Hendrycks' repositories); a folder outside its subset is refused. Every split is the test set.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

from skipkernels.data.splits import DatasetError, Item, Splits, name_lines

SUBSETS_FILE = Path(__file__).with_name("imagenet_subsets.json")
# name: (CoOp's folder, its image folder, how its class folders are named)
VARIANTS = {
    "imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "label"),
    "imagenet_sketch": ("imagenet-sketch", "images", "wnid"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "wnid"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "wnid"),
}
SUBSET_SIZE = 200


@functools.lru_cache(maxsize=None)
def _subsets() -> dict:
    return json.loads(SUBSETS_FILE.read_text(encoding="utf-8"))


def imagenet_wnids() -> list[str]:
    """ImageNet's 1000 WordNet ids in its label order."""
    return list(_subsets()["imagenet_wnids"]["wnids"])


def subset_indices(name: str) -> list[int]:
    """The ImageNet labels of the 200 classes of ``imagenet_a`` or ``imagenet_r``, ascending."""
    if name not in ("imagenet_a", "imagenet_r"):
        raise ValueError(f"subset_indices: name must be 'imagenet_a' or 'imagenet_r', got {name!r}")
    return list(_subsets()[name]["indices"])


def subset_wnids(name: str) -> list[str]:
    """The WordNet ids of ``subset_indices(name)``, in the same order."""
    wnids = imagenet_wnids()
    return [wnids[i] for i in subset_indices(name)]


def read_classnames(path: Path) -> dict[str, str]:
    """``{wnid: class name}`` from a ``classnames.txt``, in the file's (ImageNet's label) order."""
    if not path.is_file():
        raise DatasetError(f"class names file not found: {path} (copy ImageNet's classnames.txt there: lines "
                           "'<wnid> <class name>')")
    names: dict[str, str] = {}
    for n, wnid, name in name_lines(path, "wnid"):
        if wnid in names:
            raise DatasetError(f"{path}:{n}: wnid {wnid} is listed twice")
        names[wnid] = name
    if not names:
        raise DatasetError(f"{path} lists no classes")
    _check_label_order(list(names), path)
    return names


def _check_label_order(wnids: list[str], path: Path) -> None:
    """ImageNet's full list must be in its label order; a shorter list (a part of it) in the same order."""
    order = {w: i for i, w in enumerate(imagenet_wnids())}
    if len(wnids) == len(order) and wnids != imagenet_wnids():
        bad = next(i for i, (a, b) in enumerate(zip(wnids, imagenet_wnids())) if a != b)
        raise DatasetError(f"{path} is not in ImageNet's label order: line {bad + 1} has {wnids[bad]}, ImageNet's "
                           f"label {bad} is {imagenet_wnids()[bad]}")
    known = [order[w] for w in wnids if w in order]
    if known != sorted(known):
        raise DatasetError(f"{path}: its wnids are not in ImageNet's label order (sorted wnids)")


def _list_images(folder: Path) -> list[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and (folder / f).is_file())


def read_variant(root: Path, name: str) -> Splits:
    """The test items of ImageNet variant ``name`` (a key of ``VARIANTS``) under data root ``root``."""
    folder_name, image_name, naming = VARIANTS[name]
    folder = Path(root) / folder_name
    if not folder.is_dir():
        raise DatasetError(f"{name}: dataset folder not found: {folder}")
    classnames = read_classnames(folder / "classnames.txt")
    image_dir = folder / image_name
    if not image_dir.is_dir():
        raise DatasetError(f"{name}: image folder not found: {image_dir}")
    wnids = list(classnames)
    if naming == "label":  # ImageNet-V2: folders 0..999, one per line of classnames.txt
        folders = [(str(label), wnid) for label, wnid in enumerate(wnids)]
        missing = [f for f, _ in folders if not (image_dir / f).is_dir()]
        if missing:
            raise DatasetError(f"{name}: class folders missing in {image_dir}: {', '.join(missing[:10])}"
                               f"{' ...' if len(missing) > 10 else ''} (one folder per line of classnames.txt)")
    else:
        present = sorted(f for f in os.listdir(image_dir) if (image_dir / f).is_dir() and not f.startswith("."))
        allowed = set(subset_wnids(name)) if name in ("imagenet_a", "imagenet_r") else set(wnids)
        unknown = [f for f in present if f not in allowed]
        if unknown:
            where = f"one of the {SUBSET_SIZE} classes of {name}" if name in ("imagenet_a", "imagenet_r") \
                else f"listed in {folder / 'classnames.txt'}"
            raise DatasetError(f"{name}: class folder {image_dir / unknown[0]} is not {where}")
        unnamed = [f for f in present if f not in classnames]
        if unnamed:
            raise DatasetError(f"{name}: class folder {image_dir / unnamed[0]} has no line in "
                               f"{folder / 'classnames.txt'}")
        if not present:
            raise DatasetError(f"{name}: no class folders in {image_dir}")
        rank = {w: i for i, w in enumerate(wnids)}
        folders = [(f, f) for f in sorted(present, key=rank.__getitem__)]
        expected = SUBSET_SIZE if name in ("imagenet_a", "imagenet_r") else len(wnids)
        if len(present) < expected:
            warnings.warn(f"{name}: {len(present)} of its {expected} class folders are in {image_dir}; it is "
                          "evaluated on those", stacklevel=2)
    test = []
    for label, (sub, wnid) in enumerate(folders):
        test.extend(Item(str(image_dir / sub / f), label, classnames[wnid]) for f in _list_images(image_dir / sub))
    if not test:
        raise DatasetError(f"{name}: no images in the class folders of {image_dir}")
    return Splits(name, [], [], test, [classnames[w] for _, w in folders])
