"""Learning-rate schedule of the paper's protocol (Dassl's): constant warm-up, then cosine.

Stepped per epoch like Dassl: epochs < warmup use ``warmup_lr``; after that the cosine over
``epochs`` periods starts from the base rate (so it does not reach zero at the last epoch).
"""
from __future__ import annotations

import math


def lr_at(epoch: int, base_lr: float, epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-6) -> float:
    if epoch < warmup_epochs:
        return warmup_lr
    t = epoch - warmup_epochs
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t / max(1, epochs)))


def set_epoch_lr(optimizer, epoch: int, epochs: int, warmup_epochs: int, warmup_lr: float) -> None:
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = lr_at(epoch, group["base_lr"], epochs, warmup_epochs, warmup_lr)
