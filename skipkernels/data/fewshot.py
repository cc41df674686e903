"""Few-shot sampling and the base-to-new class split (CoOp/CoCoOp protocol)."""
from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict

from skipkernels.data.coop import DatasetError, Item


def sample_few_shot(items: list[Item], shots: int, seed: int, readable=None) -> list[Item]:
    """``shots`` items per label, drawn with ``random.Random(seed)``, labels in ascending order.
    ``shots`` <= 0 keeps everything.

    ``readable(item) -> bool``, when given, is checked for every drawn item; an unreadable one is
    skipped (counted, with one warning) and replaced by a further draw from the same class. Only a
    class left with fewer readable images than ``shots`` is an error.
    """
    by_label: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        by_label[item.label].append(item)
    rng = random.Random(seed)
    out, skipped = [], []
    for label in sorted(by_label):
        pool = by_label[label]
        want = len(pool) if shots <= 0 else shots
        if len(pool) < want:
            raise DatasetError(f"class {label} ({pool[0].classname!r}) has {len(pool)} training images, "
                               f"fewer than the {shots} shots requested")
        order = rng.sample(pool, want) if shots > 0 else list(pool)
        drawn = set(order)
        rest = [it for it in pool if it not in drawn] if readable is not None else []
        rng.shuffle(rest)
        chosen, class_skipped = [], []
        for position, item in enumerate(order):
            while item is not None and readable is not None and not readable(item):
                class_skipped.append(item)
                item = rest.pop() if rest else None
            if item is None:
                if shots <= 0:
                    continue
                # the files not tried yet are tried too, so the message is the same for every seed
                unreadable = sorted([it.path for it in class_skipped] +
                                    [it.path for it in order[position + 1:] if not readable(it)])
                raise DatasetError(f"class {label} ({pool[0].classname!r}) has fewer than {shots} readable "
                                   f"training images: {len(pool) - len(unreadable)} of {len(pool)}; unreadable: "
                                   f"{', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}")
            chosen.append(item)
        if not chosen:  # shots <= 0 (all images) and none of them readable
            raise DatasetError(f"class {label} ({pool[0].classname!r}) has no readable training images; "
                               f"unreadable: {', '.join(it.path for it in class_skipped[:5])}"
                               f"{' ...' if len(class_skipped) > 5 else ''}")
        skipped.extend(class_skipped)
        out.extend(chosen)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable training images (first: {skipped[0].path})",
                      stacklevel=2)
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
