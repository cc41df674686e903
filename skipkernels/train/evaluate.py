"""Accuracy on base and new classes, and their harmonic mean."""
from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from skipkernels import distributed
from skipkernels.data.fewshot import subset_classes
from skipkernels.data.images import EvalTransform, ItemDataset, make_loader, preprocess_config
from skipkernels.ops.subset_ce import class_scores_topk


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@torch.no_grad()
def accuracy(tuner, items, classnames, batch_size: int = 64, workers: int = 0, autocast_dtype=None,
             progress: bool = True, description: str = "eval") -> float:
    """Top-1 accuracy (percent) of ``tuner``'s current model on ``items`` among ``classnames``."""
    if not items:
        raise ValueError(f"{description}: no test items")
    model = tuner.model
    was_training = model.training
    model.eval()
    device = tuner.device
    size, mean, std = preprocess_config(model)
    shard = items[distributed.rank()::distributed.world_size()]  # each rank scores its share
    loader = make_loader(ItemDataset(shard, EvalTransform(size, mean, std), skip_unreadable=True), batch_size,
                         workers)
    correct = torch.zeros((), dtype=torch.long, device=device)  # counted on the device: no read-back a batch
    scored = 0
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        text = tuner.encode_classes(classnames, normalize=True).float()
        scale = torch.ones((), device=device)
        for images, labels, _ in tqdm(loader, desc=description, disable=not progress, leave=False):
            if labels.numel() == 0:
                continue
            f = tuner.encode_images(images.to(device), normalize=True).float()
            _, top, _ = class_scores_topk(f, text, scale, k=1, backend=tuner.policy)
            correct += (top[:, 0] == labels.to(device)).sum()
            scored += labels.numel()
    model.train(was_training)
    correct, scored = (int(v) for v in distributed.all_reduce_sum(torch.tensor([int(correct), scored])))
    if scored < len(items):
        warnings.warn(f"{description}: skipped {len(items) - scored} unreadable test images; accuracy is over "
                      f"the {scored} readable ones", stacklevel=2)
    if scored == 0:
        raise ValueError(f"{description}: none of the {len(items)} test images could be read")
    return 100.0 * correct / scored


def class_group(items, classnames, labels) -> tuple[list, list[str]]:
    """The items of ``labels`` (relabelled 0..n-1 in that order) and their class names."""
    return subset_classes(items, labels), [classnames[i] for i in labels]


def evaluate_groups(tuner, groups: dict, batch_size: int = 64, workers: int = 0, autocast_dtype=None,
                    progress: bool = True, prefix: str = "eval") -> dict:
    """Accuracy per group ``{name: (items, classnames)}``, plus "hm" when both base and new are in."""
    acc = {name: accuracy(tuner, items, names, batch_size, workers, autocast_dtype, progress, f"{prefix} {name}")
           for name, (items, names) in groups.items()}
    if "base" in acc and "new" in acc:
        acc["hm"] = harmonic_mean(acc["base"], acc["new"])
    return acc
