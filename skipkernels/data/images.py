"""Image loading, CLIP preprocessing and deterministic augmentation.

Augmentation randomness comes from (seed, epoch, index) alone, not from a global RNG, so an
epoch's images are the same whatever the worker count and after a resume.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from skipkernels.data.splits import Item

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageReadError(RuntimeError):
    """An image file that can't be opened or decoded; names the file."""


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as err:
        raise ImageReadError(f"image file not found: {path}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(f"cannot decode image {path}: {err}") from err


def is_readable(item) -> bool:
    """Whether an Item (or a path) decodes as training and evaluation decode it."""
    try:
        load_rgb(str(getattr(item, "path", item)))
        return True
    except ImageReadError:
        return False


def preprocess_config(model) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) the model's image tower was trained with. A Hugging Face model keeps
    no image statistics in its config: CLIP's are OpenAI's, SigLIP's 0.5 (their processors')."""
    vision_config = getattr(getattr(model, "config", None), "vision_config", None)
    if vision_config is not None and not hasattr(model, "visual"):
        from skipkernels.families import hf_image_size
        size = hf_image_size(vision_config)
        if model.config.model_type in ("siglip", "siglip2"):
            return int(size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        return int(size), tuple(OPENAI_MEAN), tuple(OPENAI_STD)
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size), tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


def _to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (array - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _random_resized_box(width: int, height: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: central square crop
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class TrainTransform:
    """CoOp's training augmentation: random resized crop + horizontal flip + CLIP normalisation."""

    def __init__(self, size: int, mean, std):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        box = _random_resized_box(img.width, img.height, rng)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img, self.mean, self.std)


class EvalTransform:
    """Resize the shorter side (bicubic), centre crop, CLIP normalisation."""

    def __init__(self, size: int, mean, std):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, img: Image.Image, rng=None) -> torch.Tensor:
        scale = self.size / min(img.width, img.height)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        img = img.resize((w, h), Image.BICUBIC)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return _to_tensor(img, self.mean, self.std)


def item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) & 0x7FFFFFFF


class ItemDataset(torch.utils.data.Dataset):
    """Returns (image tensor, label, index); ``set_epoch`` changes the augmentation draw."""

    def __init__(self, items: list[Item], transform, seed: int = 0, skip_unreadable: bool = False):
        self.items = items
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.skip_unreadable = skip_unreadable  # evaluation: yield None for a file that can't be read

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        rng = random.Random(item_seed(self.seed, self.epoch, index))
        try:
            image = load_rgb(item.path)
        except ImageReadError:
            if self.skip_unreadable:
                return None, item.label, index
            raise
        return self.transform(image, rng), item.label, index


def collate(batch):
    batch = [b for b in batch if b[0] is not None]  # unreadable files (evaluation) are dropped
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    images, labels, indices = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)


def make_loader(dataset, batch_size: int = 64, workers: int = 0, batch_sampler=None):
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                           collate_fn=collate, pin_memory=torch.cuda.is_available())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate, pin_memory=torch.cuda.is_available())


def epoch_batches(labels: list[int], batch_size: int, same_class: bool, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one epoch. ``same_class``: every batch holds one class (the protocol for
    shots >= 4); the last partial batch of a class is kept. Order depends only on (seed, epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(item_seed(seed, epoch, 0x5EED))
    if not same_class:
        order = list(range(len(labels)))
        rng.shuffle(order)
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    batches = []
    for label in sorted(by_label):
        members = by_label[label][:]
        rng.shuffle(members)
        batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    rng.shuffle(batches)
    return batches
