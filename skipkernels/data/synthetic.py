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


def draw_image(colour: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    grey = rng.randint(150, 235)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    pixels = img.load()
    for _ in range(size * size // 6):  # speckle noise so no two images are alike
        x, y = rng.randrange(size), rng.randrange(size)
        g = max(0, min(255, grey + rng.randint(-40, 40)))
        pixels[x, y] = (g, g, g)
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.22, 0.38) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    fill = _jitter(COLOURS[colour], rng)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    else:
        sides = 4 if shape == "square" else 3
        turn = rng.uniform(0, 2 * math.pi)
        points = [(cx + radius * math.cos(turn + 2 * math.pi * k / sides),
                   cy + radius * math.sin(turn + 2 * math.pi * k / sides)) for k in range(sides)]
        draw.polygon(points, fill=fill)
    return img


def generate(folder: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    images = folder / "images"
    split = {}
    for part, count in SPLIT_COUNTS.items():
        entries = []
        for label, (colour, shape) in enumerate(CLASSES):
            class_dir = images / f"{colour}_{shape}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                rel = f"{colour}_{shape}/{part}_{n:03d}.png"
                draw_image(colour, shape, rng).save(images / rel)
                entries.append([rel, label, f"{colour} {shape}"])
        split[part] = entries
    (folder / "split_zhou_Synthetic.json").write_text(json.dumps(split, indent=1), encoding="utf-8")


def ensure_synthetic(root: Path | None = None, seed: int = 0) -> Path:
    """Generate the set once under ``root`` (default: the skipkernels cache); return the data root
    that holds the ``synthetic`` folder. Written to a temporary folder, then renamed, so a killed
    run never leaves a half-written set behind."""
    root = Path(root) if root is not None else default_cache_dir() / f"data-v{VERSION}-seed{seed}"
    folder = root / "synthetic"
    if (folder / "split_zhou_Synthetic.json").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
    try:
        generate(tmp, seed)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "split_zhou_Synthetic.json").is_file():  # not a concurrent writer
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
