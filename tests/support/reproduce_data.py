"""Tiny datasets in the layouts the paper's protocols read (CoOp's DATASETS.md), written by tests:
a few solid-colour images per class, so the tiny model trains on them in seconds."""
import json

import numpy as np
from PIL import Image

from skipkernels.data.coop import STANDARD_DATASETS
from skipkernels.data.imagenet_variants import subset_wnids

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]
# Four ImageNet classes in both the -A and the -R subsets, in ImageNet's label order.
WNIDS = [w for w in subset_wnids("imagenet_a") if w in set(subset_wnids("imagenet_r"))][:4]


def _image(path, colour, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.empty((24, 24, 3), np.uint8)
    pixels[:] = colour
    pixels[n % 24, :, :] = 255 - np.array(colour, np.uint8)  # images of a class differ a little
    Image.fromarray(pixels).save(path)


def coop_dataset(root, name, classes=("red shape", "green shape", "blue shape", "yellow shape"), per_part=2):
    """A split_zhou_*.json dataset under ``root`` in the folder CoOp names for ``name``."""
    spec = STANDARD_DATASETS[name]
    folder = root / spec.folder
    images = folder / spec.image_dir
    entries = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        for part in entries:
            for n in range(per_part):
                rel = f"{cls.replace(' ', '_')}/{part}_{n}.png"
                _image(images / rel, COLOURS[label % len(COLOURS)], n + 3 * label)
                entries[part].append([rel, label, cls])
    (folder / spec.split_file).write_text(json.dumps(entries))
    return folder


def _classnames(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} colour {i}\n" for i, w in enumerate(WNIDS)))


def imagenet(root, per_class=2):
    folder = root / "imagenet"
    _classnames(folder)
    for label, wnid in enumerate(WNIDS):
        for part in ("train", "val"):
            for n in range(per_class):
                _image(folder / "images" / part / wnid / f"{n}.JPEG", COLOURS[label], n)
    return folder


def imagenet_variants(root, per_class=2):
    """ImageNet-V2, -Sketch, -A and -R with the four classes of ``imagenet``."""
    layouts = {"imagenetv2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", True),
               "imagenet_sketch": ("imagenet-sketch", "images", False),
               "imagenet_a": ("imagenet-adversarial", "imagenet-a", False),
               "imagenet_r": ("imagenet-rendition", "imagenet-r", False)}
    for folder_name, image_dir, numbered in layouts.values():
        folder = root / folder_name
        _classnames(folder)
        for label, wnid in enumerate(WNIDS):
            for n in range(per_class):
                _image(folder / image_dir / (str(label) if numbered else wnid) / f"{n}.jpg", COLOURS[label], n + 1)


def write_datasets(root, variants: bool = False):
    """caltech101, dtd and imagenet (and the ImageNet variants) under ``root``: a tiny sweep's data."""
    for name in ("caltech101", "dtd"):
        coop_dataset(root, name)
    imagenet(root)
    if variants:
        imagenet_variants(root)
    return root
