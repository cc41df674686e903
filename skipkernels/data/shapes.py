"""The compositional shapes set: what ``skipkernels-tiny-shapes`` was pretrained on and the demo's classes.

Six colours x four shapes make 24 classes. The demo's new classes are six of them that the
pretraining never showed, neither as images nor as captions: its zero-shot accuracy on them
comes only from having learnt the colour words and the shape words on other combinations.
Its base classes were pretrained on, but the demo's images differ from the pretraining ones:
their backgrounds are tinted with another palette colour, the shift the fine-tuning adapts to.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from skipkernels.data.synthetic import COLOURS, default_cache_dir, draw_image, ensure_generated

VERSION = 1
PALETTE = {**COLOURS, "purple": (140, 60, 190), "orange": (245, 135, 30)}
SHAPES = ("circle", "square", "triangle", "star")
DATASET = "shapes"  # the folder under the data root
SPLIT_NAME = "Shapes"

# Colour i takes shape i mod 4 (new) and shape (i + 2) mod 4 (base): each half holds every colour
# and every shape, and the two halves share no class.
DEMO_NEW = tuple((colour, SHAPES[i % 4]) for i, colour in enumerate(PALETTE))
DEMO_BASE = tuple((colour, SHAPES[(i + 2) % 4]) for i, colour in enumerate(PALETTE))
DEMO_CLASSES = DEMO_BASE + DEMO_NEW  # base = the first half of the labels, as base_new_labels splits
PRETRAIN_CLASSES = tuple((colour, shape) for colour in PALETTE for shape in SHAPES if (colour, shape) not in DEMO_NEW)


def classname(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def draw_pretraining_image(colour: str, shape: str, rng: random.Random) -> Image.Image:
    return draw_image(colour, shape, rng, palette=PALETTE)


def draw_demo_image(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A demo image: the background is tinted with a palette colour other than the shape's."""
    tint = PALETTE[rng.choice([c for c in PALETTE if c != colour])]
    return draw_image(colour, shape, rng, palette=PALETTE, tint=tint)


def ensure_shapes(root: Path | None = None, seed: int = 0) -> Path:
    """The demo's 12 classes (``DEMO_CLASSES``) in CoOp's layout, generated once under ``root``
    (default: the skipkernels cache); returns the data root that holds the ``shapes`` folder."""
    root = Path(root) if root is not None else default_cache_dir() / f"shapes-v{VERSION}-seed{seed}"
    return ensure_generated(root, DATASET, seed, DEMO_CLASSES, SPLIT_NAME, draw_demo_image)
