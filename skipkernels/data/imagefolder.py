"""Plain image folders: ``<dir>/<class folder>/*.jpg|png|...``, without a split file.

Labels follow the sorted class-folder names, so the base classes are the first half of that order
(the CoOp rule). The train / val / test split is drawn per class with the seed: ``shots`` images
to train, up to ``min(shots, 4)`` to validate (CoOp's few-shot val size) and the rest to test, at
least one. Every image is opened once first and the unreadable ones are left out (one warning
counts and names them), so the split is drawn from readable images only: whether a class has
enough images never depends on the seed. The drawn split is returned as ordinary ``Splits``;
``write_split_json`` saves it in CoOp's format so the run can be repeated exactly from that file.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

from skipkernels.data.images import is_readable
from skipkernels.data.splits import DatasetError, Item, Splits, name_lines

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLASSNAMES_FILE = "classnames.txt"
MAX_VAL_PER_CLASS = 4
ALL_SHOTS_TEST_FRACTION = 0.2  # shots <= 0 (all images): a fifth of each class is held out to test
NAMED_FILES = 5  # unreadable files named in a message


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_image_folder(folder: Path) -> bool:
    """True for a folder of class sub-folders and no ``split_zhou_*.json`` (that layout wins)."""
    return folder.is_dir() and not any(folder.glob("split_zhou_*.json")) and bool(_visible_dirs(folder))


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (sub-folders included), by extension, in sorted order."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))


def _read_classnames(folder: Path, class_dirs: list[str]) -> dict[str, str]:
    """Display names: ``classnames.txt`` lines ``<folder> <class name>`` (ImageNet's format in
    CoOp), else the folder name with underscores as spaces."""
    path = folder / CLASSNAMES_FILE
    if not path.is_file():
        return {d: d.replace("_", " ") for d in class_dirs}
    names = {key: name for _, key, name in name_lines(path, "folder")}
    unknown = sorted(set(names) - set(class_dirs))
    missing = sorted(set(class_dirs) - set(names))
    if unknown or missing:
        raise DatasetError(f"{path} does not match the class folders: no folder for {unknown[:5]}, "
                           f"no name for {missing[:5]}")
    return names


def _split_sizes(count: int, shots: int) -> tuple[int, int]:
    """(train, val) sizes for a class of ``count`` images; the rest is its test set."""
    if shots <= 0:
        test = max(1, round(count * ALL_SHOTS_TEST_FRACTION))
        val = min(MAX_VAL_PER_CLASS, (count - test) // 5)
        return count - test - val, val
    val = min(shots, MAX_VAL_PER_CLASS, (count - shots) // 2)  # keep at least as many to test
    return shots, val


def _named(paths: list[Path], base: Path) -> str:
    """The first few of ``paths``, relative to ``base`` (which the message names)."""
    more = f" and {len(paths) - NAMED_FILES} more" if len(paths) > NAMED_FILES else ""
    return ", ".join(str(p.relative_to(base)) for p in paths[:NAMED_FILES]) + more


def _class_images(class_dir: Path, shots: int) -> tuple[list[Path], list[Path]]:
    """(readable, unreadable) image files of one class folder; DatasetError when the readable ones
    are too few for ``shots`` (one image is always kept to test)."""
    files = image_files(class_dir)
    if not files:
        raise DatasetError(f"class folder {class_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    minimum = shots + 1 if shots > 0 else 2
    need = f"the {minimum} needed for {shots} shots (at least one image is kept to test)" if shots > 0 \
        else "the 2 needed (one to train, one to test)"
    if len(files) < minimum:  # too few whatever their content: said before any file is opened
        raise DatasetError(f"class folder {class_dir} has {len(files)} images, fewer than {need}")
    readable, unreadable = [], []
    for path in files:
        (readable if is_readable(path) else unreadable).append(path)
    if len(readable) < minimum:
        raise DatasetError(f"class folder {class_dir} has {len(readable)} readable images, fewer than {need}; "
                           f"unreadable: {_named(unreadable, class_dir)}")
    return readable, unreadable


def image_folder_splits(folder, shots: int, seed: int) -> Splits:
    """The seeded train / val / test split of an image folder, drawn from its readable images;
    raises DatasetError with the folder or file at fault."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}")
    class_dirs = _visible_dirs(folder)
    if not class_dirs:
        raise DatasetError(f"{folder} has no class folders: expected {folder}/<class name>/<images>")
    if len(class_dirs) < 2:
        raise DatasetError(f"{folder} has one class folder ({class_dirs[0].name}); classifying needs at least 2 "
                           "(a folder in CoOp's layout needs its split_zhou_*.json)")
    names = _read_classnames(folder, [d.name for d in class_dirs])
    if len(set(names.values())) != len(names):
        raise DatasetError(f"{folder}: two class folders have the same class name; rename one "
                           f"(underscores become spaces) or give names in {CLASSNAMES_FILE}")
    parts: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    left_out: list[Path] = []
    for label, class_dir in enumerate(class_dirs):
        # Unreadable files are left out before the draw: a seed that put one among the training
        # images would otherwise fail where another seed works.
        files, unreadable = _class_images(class_dir, shots)
        left_out.extend(unreadable)
        # One generator per class, seeded by its folder name: adding a class leaves the others' draws alone.
        random.Random(f"{seed}:{class_dir.name}").shuffle(files)
        n_train, n_val = _split_sizes(len(files), shots)
        drawn = {"train": files[:n_train], "val": files[n_train:n_train + n_val], "test": files[n_train + n_val:]}
        for part, paths in drawn.items():
            parts[part].extend(Item(str(p), label, names[class_dir.name]) for p in sorted(paths))
    if left_out:
        warnings.warn(f"{folder}: left out {len(left_out)} unreadable images, the split is drawn from the "
                      f"readable ones: {_named(left_out, folder)}", stacklevel=3)
    classnames = [names[d.name] for d in class_dirs]
    return Splits(folder.name, parts["train"], parts["val"], parts["test"], classnames, generated=True)
