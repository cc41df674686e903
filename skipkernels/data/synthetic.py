"""The embedded default dataset: coloured shapes, generated deterministically in CoOp's layout.

Twelve classes, four colours x three shapes, ordered so that the base half (first six labels)
and the new half both contain every colour and every shape: a model that learns the words can
in principle transfer to the unseen combinations.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

VERSION = 1
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 205, 40)}
CLASSES = [
    ("red", "circle"), ("green", "square"), ("blue", "triangle"),
    ("yellow", "circle"), ("red", "square"), ("green", "triangle"),
    ("blue", "circle"), ("yellow", "square"), ("red", "triangle"),
    ("green", "circle"), ("blue", "square"), ("yellow", "triangle"),
]
SPLIT_COUNTS = {"train": 16, "val": 4, "test": 16}
IMAGE_SIZE = 48


def classnames() -> list[str]:
    return [f"{colour} {shape}" for colour, shape in CLASSES]


def default_cache_dir() -> Path:
    base = os.environ.get("SKIPKERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "skipkernels")
    return Path(base)


def _jitter(rgb, rng, amount=25):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


POLYGON_SIDES = {"triangle": 3, "square": 4}
STAR_INNER_RADIUS = 0.45  # of the outer radius: a five-pointed star that stays a star at 32 pixels


def draw_image(colour: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE, palette: dict = COLOURS,
               tint: tuple | None = None) -> Image.Image:
    """A ``colour`` ``shape`` (circle, star or one of ``POLYGON_SIDES``) at a random place, size and
    turn on a speckled grey background, mixed half and half with the colour ``tint`` if given."""
    grey = rng.randint(150, 235)
    paper = (grey,) * 3 if tint is None else tuple((grey + c) // 2 for c in tint)
    img = Image.new("RGB", (size, size), paper)
    pixels = img.load()
    for _ in range(size * size // 6):  # speckle noise so no two images are alike
        x, y = rng.randrange(size), rng.randrange(size)
        shift = rng.randint(-40, 40)
        pixels[x, y] = tuple(max(0, min(255, c + shift)) for c in paper)
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.22, 0.38) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    fill = _jitter(palette[colour], rng)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        return img
    turn = rng.uniform(0, 2 * math.pi)
    if shape == "star":  # ten corners, alternately on the outer and the inner radius
        radii = [radius if k % 2 == 0 else radius * STAR_INNER_RADIUS for k in range(10)]
    elif shape in POLYGON_SIDES:
        radii = [radius] * POLYGON_SIDES[shape]
    else:
        raise ValueError(f"unknown shape {shape!r}: circle, star or one of {sorted(POLYGON_SIDES)}")
    points = [(cx + r * math.cos(turn + 2 * math.pi * k / len(radii)),
               cy + r * math.sin(turn + 2 * math.pi * k / len(radii))) for k, r in enumerate(radii)]
    draw.polygon(points, fill=fill)
    return img


def generate(folder: Path, seed: int = 0, classes=CLASSES, split_name: str = "Synthetic",
             draw: Callable[[str, str, random.Random], Image.Image] = draw_image) -> None:
    """Draw (with ``draw``) ``SPLIT_COUNTS`` images of each (colour, shape) of ``classes`` into
    ``folder`` in CoOp's layout; the labels follow the order of ``classes``."""
    rng = random.Random(seed)
    images = folder / "images"
    split = {}
    for part, count in SPLIT_COUNTS.items():
        entries = []
        for label, (colour, shape) in enumerate(classes):
            class_dir = images / f"{colour}_{shape}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                rel = f"{colour}_{shape}/{part}_{n:03d}.png"
                draw(colour, shape, rng).save(images / rel)
                entries.append([rel, label, f"{colour} {shape}"])
        split[part] = entries
    (folder / f"split_zhou_{split_name}.json").write_text(json.dumps(split, indent=1), encoding="utf-8")


def ensure_synthetic(root: Path | None = None, seed: int = 0) -> Path:
    """Generate the set once under ``root`` (default: the skipkernels cache); return the data root
    that holds the ``synthetic`` folder."""
    root = Path(root) if root is not None else default_cache_dir() / f"data-v{VERSION}-seed{seed}"
    return ensure_generated(root, "synthetic", seed)


def ensure_generated(root: Path, dataset: str, seed: int = 0, classes=CLASSES, split_name: str = "Synthetic",
                     draw: Callable[[str, str, random.Random], Image.Image] = draw_image) -> Path:
    """Generate a set of ``generate`` once as ``root/dataset``; return ``root``. Written to a
    temporary folder, then renamed, so a killed run never leaves a half-written set behind."""
    folder = root / dataset
    split_file = f"split_zhou_{split_name}.json"
    if (folder / split_file).is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dataset}-", dir=root))
    try:
        generate(tmp, seed, classes, split_name, draw)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / split_file).is_file():  # not a concurrent writer
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
