"""Datasets in the CoOp/Dassl layout.

``<root>/<dataset folder>/split_zhou_<Name>.json`` holds {"train": [...], "val": [...],
"test": [...]}, each entry ``[relative_path, label, classname]`` relative to the image folder.
ImageNet and FGVC-Aircraft ship their own list files in CoOp's layout and are read from those.
Any other folder with one ``split_zhou_*.json`` works too.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from skipkernels.data.imagefolder import image_folder_splits, is_image_folder
from skipkernels.data.imagenet_variants import VARIANTS, read_variant
from skipkernels.data.splits import DatasetError, Item, Splits  # noqa: F401  (re-exported: the data API)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    folder: str
    image_dir: str
    split_file: str | None  # None: read by a dataset-specific reader


# CoOp's DATASETS.md layout for the 11 benchmark datasets (plus the embedded synthetic set).
STANDARD_DATASETS = {
    "imagenet": DatasetSpec("imagenet", "images", None),
    "caltech101": DatasetSpec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": DatasetSpec("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": DatasetSpec("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": DatasetSpec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": DatasetSpec("food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": DatasetSpec("fgvc_aircraft", "images", None),
    "sun397": DatasetSpec("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": DatasetSpec("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": DatasetSpec("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": DatasetSpec("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
    "synthetic": DatasetSpec("synthetic", "images", "split_zhou_Synthetic.json"),
    # ImageNet's test-only variants (skipkernels.data.imagenet_variants)
    **{name: DatasetSpec(folder, images, None) for name, (folder, images, _) in VARIANTS.items()},
}

# The paper trains these three for a quarter of the epochs (they are large).
QUARTER_EPOCH_DATASETS = ("imagenet", "sun397", "food101")


def _classnames_from(items: list[Item], where: str) -> list[str]:
    names: dict[int, str] = {}
    for item in items:
        if item.label < 0:
            raise DatasetError(f"{where}: negative label {item.label} for {item.path}")
        previous = names.setdefault(item.label, item.classname)
        if previous != item.classname:
            raise DatasetError(f"{where}: label {item.label} is named both {previous!r} and {item.classname!r}")
    if not names:
        raise DatasetError(f"{where}: no items")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        missing = sorted(set(range(labels[-1] + 1)) - set(labels))
        raise DatasetError(f"{where}: labels must be 0..C-1 without gaps; missing {missing[:10]}")
    return [names[i] for i in labels]


def _read_split_json(path: Path, image_dir: Path) -> tuple[list[Item], list[Item], list[Item]]:
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"malformed split file {path}: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"malformed split file {path}: expected an object with train/val/test lists")
    out = []
    for part in ("train", "val", "test"):
        entries = data.get(part)
        if not isinstance(entries, list):
            raise DatasetError(f"malformed split file {path}: '{part}' must be a list")
        items = []
        for n, entry in enumerate(entries):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                    or isinstance(entry[1], bool) or not isinstance(entry[1], int) or not isinstance(entry[2], str)):
                raise DatasetError(f"malformed split file {path}: {part}[{n}] must be [path, int label, classname], "
                                   f"got {entry!r}")
            items.append(Item(str(image_dir / entry[0]), int(entry[1]), entry[2]))
        out.append(items)
    return out[0], out[1], out[2]


def _read_imagenet(folder: Path) -> tuple[list[Item], list[Item], list[Item]]:
    names_file = folder / "classnames.txt"
    if not names_file.is_file():
        raise DatasetError(f"ImageNet needs {names_file} (lines '<wnid> <class name>')")
    wnids, names = [], []
    for line in names_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            wnids.append(wnid)
            names.append(name.strip())

    def read(part):
        items = []
        for label, (wnid, name) in enumerate(zip(wnids, names)):
            class_dir = folder / "images" / part / wnid
            if not class_dir.is_dir():
                raise DatasetError(f"ImageNet class folder missing: {class_dir}")
            for file in sorted(os.listdir(class_dir)):
                items.append(Item(str(class_dir / file), label, name))
        return items

    train = read("train")
    test = read("val")  # CoOp evaluates ImageNet on its val set
    return train, test, test


def _read_aircraft(folder: Path) -> tuple[list[Item], list[Item], list[Item]]:
    variants_file = folder / "variants.txt"
    if not variants_file.is_file():
        raise DatasetError(f"FGVC-Aircraft needs {variants_file}")
    variants = [v.strip() for v in variants_file.read_text(encoding="utf-8").splitlines() if v.strip()]
    label_of = {name: i for i, name in enumerate(variants)}

    def read(part):
        list_file = folder / f"images_variant_{part}.txt"
        if not list_file.is_file():
            raise DatasetError(f"FGVC-Aircraft list file missing: {list_file}")
        items = []
        for line in list_file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise DatasetError(f"{list_file}: unknown variant {variant!r}")
            items.append(Item(str(folder / "images" / f"{image_id}.jpg"), label_of[variant], variant))
        return items

    return read("train"), read("val"), read("test")


def resolve_folder(root: str | os.PathLike, dataset: str | None) -> tuple[str, Path, DatasetSpec | None]:
    root = Path(root).expanduser()
    if dataset is None:
        return root.name, root, None
    key = dataset.lower().replace("-", "_")
    spec = STANDARD_DATASETS.get(key)
    if spec is not None:
        folder = root / spec.folder
        if not folder.is_dir() and (root / dataset).is_dir():
            folder = root / dataset
        return key, folder, spec
    return dataset, root / dataset, None


def write_split_json(splits: Splits, path: Path) -> None:
    """Save ``splits`` in CoOp's split format. Paths are absolute, so ``--data <this file>``
    repeats the run from anywhere on this machine."""
    data = {part: [[str(Path(it.path).resolve()), it.label, it.classname] for it in getattr(splits, part)]
            for part in ("train", "val", "test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def load_splits(root: str | os.PathLike, dataset: str | None = None, shots: int = 16, seed: int = 1) -> Splits:
    """Read a dataset: a standard name under ``root``, a ``split_zhou_*.json`` file, any folder
    (``dataset=None``: ``root`` itself) holding one, or a plain folder of class folders (split
    drawn with ``shots`` and ``seed``, see ``imagefolder``)."""
    name, folder, spec = resolve_folder(root, dataset)
    if dataset is None and folder.is_file() and folder.suffix == ".json":
        train, val, test = _read_split_json(folder, folder.parent)
        name = folder.stem.removeprefix("split_zhou_")
        return Splits(name, train, val, test, _classnames_from(train + val + test, str(folder)))
    if name in VARIANTS:
        return read_variant(Path(root).expanduser(), name)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}")
    if spec is None:
        if is_image_folder(folder):
            return image_folder_splits(folder, shots, seed)
    if spec is not None and spec.split_file is None:
        train, val, test = (_read_imagenet if name == "imagenet" else _read_aircraft)(folder)
    else:
        if spec is not None:
            split_path = folder / spec.split_file
            image_dir = folder / spec.image_dir
        else:
            candidates = sorted(folder.glob("split_zhou_*.json"))
            if len(candidates) != 1:
                raise DatasetError(f"{folder}: expected exactly one split_zhou_*.json, found "
                                   f"{[c.name for c in candidates] or 'none'}, or class folders "
                                   f"{folder}/<class name>/<images>")
            split_path = candidates[0]
            image_dir = folder / "images" if (folder / "images").is_dir() else folder
        train, val, test = _read_split_json(split_path, image_dir)
    classnames = _classnames_from(train + val + test, str(folder))
    return Splits(name, train, val, test, classnames)
