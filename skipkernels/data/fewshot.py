"""Few-shot sampling and the base-to-new class split (CoOp/CoCoOp protocol)."""
from __future__ import annotations

import math
import random
from collections import defaultdict

from skipkernels.data.coop import DatasetError, Item


def sample_few_shot(items: list[Item], shots: int, seed: int) -> list[Item]:
    """``shots`` items per label, drawn with ``random.Random(seed)``, labels in ascending order.
    ``shots`` <= 0 keeps everything."""
    if shots <= 0:
        return list(items)
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    out = []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < shots:
            raise DatasetError(f"class {label} ({pool[0].classname!r}) has {len(pool)} training images, "
                               f"fewer than the {shots} shots requested")
        out.extend(rng.sample(pool, shots))
    return out


def base_new_labels(num_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first ceil(C/2) labels, new = the rest."""
    if num_classes < 2:
        raise DatasetError(f"a base-to-new split needs at least 2 classes, got {num_classes}")
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def subset_classes(items: list[Item], labels: list[int]) -> list[Item]:
    """Items whose label is in ``labels``, relabelled 0..len(labels)-1 in that order."""
    relabel = {old: new for new, old in enumerate(labels)}
    return [Item(it.path, relabel[it.label], it.classname) for it in items if it.label in relabel]
