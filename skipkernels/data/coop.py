"""Datasets in the CoOp/Dassl layout.

``<root>/<dataset folder>/split_zhou_<Name>.json`` holds {"train": [...], "val": [...],
"test": [...]}, each entry ``[relative_path, label, classname]`` relative to the image folder.
ImageNet and FGVC-Aircraft ship their own list files in CoOp's layout and are read from those.
Any other folder with one ``split_zhou_*.json`` works too; its paths are looked up where CoOp keeps
that dataset's images, in ``images/``, the folder or a sub-folder of it. Read as a plain image
folder (``imagefolder``), a folder in CoOp's layout is refused with what to pass instead.
"""
from __future__ import annotations

import dataclasses
import itertools
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


def _read_split_json(path: Path) -> dict[str, list[tuple[str, int, str]]]:
    """The train / val / test entries ``(relative path, label, class name)`` of a split file."""
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"malformed split file {path}: {err}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"malformed split file {path}: expected an object with train/val/test lists")
    out = {}
    for part in ("train", "val", "test"):
        entries = data.get(part)
        if not isinstance(entries, list):
            raise DatasetError(f"malformed split file {path}: '{part}' must be a list")
        for n, entry in enumerate(entries):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                    or isinstance(entry[1], bool) or not isinstance(entry[1], int) or not isinstance(entry[2], str)):
                raise DatasetError(f"malformed split file {path}: {part}[{n}] must be [path, int label, classname], "
                                   f"got {entry!r}")
        out[part] = [(entry[0], int(entry[1]), entry[2]) for entry in entries]
    return out


SAMPLED_ENTRIES = 8  # entries looked up to tell where a split file's images are


def _sub_folders(folder: Path):
    yield from (d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith("."))


def _image_dir(split_path: Path, entries: dict, preferred: Path | None) -> Path:
    """The folder a split file's relative paths start from: ``preferred`` (a standard dataset's),
    the image folder CoOp uses for a split file of this name (EuroSAT's ``2750``, ...), ``images``,
    the split file's folder or one of its sub-folders; the first under which its images are found."""
    folder = split_path.parent
    by_split_name = {spec.split_file: spec.image_dir for spec in STANDARD_DATASETS.values() if spec.split_file}
    first = [preferred] if preferred is not None else []
    if split_path.name in by_split_name:
        first.append(folder / by_split_name[split_path.name])
    first += [folder / "images", folder]
    relative = [rel for part in entries.values() for rel, _, _ in part]
    sample = relative[::max(1, len(relative) // SAMPLED_ENTRIES)][:SAMPLED_ENTRIES]
    for candidate in itertools.chain(first, _sub_folders(folder)):  # the sub-folders are listed only if needed
        if any((candidate / rel).exists() for rel in sample):
            return candidate
    raise DatasetError(f"the images of {split_path} are not found: {first[0] / sample[0]} is missing, and so are "
                       f"the other {len(sample) - 1} entries looked up, under {folder} and each of its sub-folders; "
                       f"for one of CoOp's datasets pass its parent folder as --data and --dataset NAME "
                       f"({_known_names()})")


def _items(entries: dict, image_dir: Path) -> tuple[list[Item], list[Item], list[Item]]:
    train, val, test = ([Item(str(image_dir / rel), label, name) for rel, label, name in entries[part]]
                        for part in ("train", "val", "test"))
    return train, val, test


def _read_split(path: Path, preferred_image_dir: Path | None = None) -> Splits:
    entries = _read_split_json(path)
    classnames = _classnames_from([Item(rel, label, name) for part in entries.values() for rel, label, name in part],
                                  str(path))
    train, val, test = _items(entries, _image_dir(path, entries, preferred_image_dir))
    return Splits(path.stem.removeprefix("split_zhou_"), train, val, test, classnames)


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


def _known_names() -> str:
    return ", ".join(sorted(STANDARD_DATASETS))


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


def coop_layout(folder: Path) -> str | None:
    """The standard dataset whose CoOp folder ``folder`` looks like, where that layout has no split
    file (ImageNet, FGVC-Aircraft, ImageNet's variants); those with one are told by it."""
    if (folder / "classnames.txt").is_file() and (folder / "images" / "train").is_dir():
        return "imagenet"
    if (folder / "variants.txt").is_file() and (folder / "images_variant_train.txt").is_file():
        return "fgvc_aircraft"
    for name, (variant_folder, image_dir, _) in VARIANTS.items():
        if folder.name == variant_folder and (folder / image_dir).is_dir() and (folder / "classnames.txt").is_file():
            return name
    return None


def _dataset_name(folder: Path) -> str:
    """What ``--dataset`` reads ``folder`` as, under its parent: a standard name, else the folder's."""
    return next((name for name, spec in STANDARD_DATASETS.items() if spec.folder == folder.name), folder.name)


def _check_class_folders(folder: Path) -> None:
    """A CoOp dataset folder, or a root holding some, read as class folders would train on
    nonsense classes: refused, saying what to pass."""
    name = coop_layout(folder)
    if name is not None:
        raise DatasetError(f"{folder} is CoOp's {name} folder, not a folder of class folders: pass "
                           f"--data {folder.parent} --dataset {name}")
    datasets = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
                and (any(d.glob("split_zhou_*.json")) or coop_layout(d) is not None)]
    if datasets:
        names = ", ".join(coop_layout(d) or _dataset_name(d) for d in datasets)
        raise DatasetError(f"{folder} holds datasets in CoOp's layout, not class folders: pass --dataset with one "
                           f"of {names}")


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
        return _read_split(folder)
    if name in VARIANTS:
        return read_variant(Path(root).expanduser(), name)
    if not folder.is_dir():
        given = Path(root).expanduser()
        if dataset is not None and given.is_file():
            raise DatasetError(f"--data {given} is a file, and --dataset names a folder under a data root: leave "
                               "--dataset out to read the file")
        inside = spec is not None and (given.name == spec.folder
                                       or bool(spec.split_file) and (given / spec.split_file).is_file())
        if inside:
            raise DatasetError(f"{given} is the {name} folder itself, and --dataset looks for it under --data: pass "
                               f"--data {given.parent} --dataset {name}, or --data {given} alone")
        if spec is None and dataset is not None:
            raise DatasetError(f"unknown dataset {dataset!r}: neither a known name ({_known_names()}) nor a "
                               f"folder {folder}")
        raise DatasetError(f"dataset folder not found: {folder}")
    if spec is None and is_image_folder(folder):
        _check_class_folders(folder)
        return image_folder_splits(folder, shots, seed)
    if spec is not None and spec.split_file is None:
        train, val, test = (_read_imagenet if name == "imagenet" else _read_aircraft)(folder)
        return Splits(name, train, val, test, _classnames_from(train + val + test, str(folder)))
    if spec is not None:
        splits = _read_split(folder / spec.split_file, folder / spec.image_dir)
        return dataclasses.replace(splits, name=name)
    candidates = sorted(folder.glob("split_zhou_*.json"))
    if len(candidates) != 1:
        raise DatasetError(f"{folder}: expected exactly one split_zhou_*.json, found "
                           f"{[c.name for c in candidates] or 'none'}, or class folders "
                           f"{folder}/<class name>/<images>")
    splits = _read_split(candidates[0])
    return dataclasses.replace(splits, name=name)
