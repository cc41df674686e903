"""Accuracy on base and new classes, and their harmonic mean; the split a run is evaluated on."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from skipkernels import distributed
from skipkernels.data.coop import load_splits, resolve_folder
from skipkernels.data.fewshot import base_new_labels, subset_classes
from skipkernels.data.splits import DatasetError, Splits
from skipkernels.data.images import EvalTransform, ItemDataset, make_loader, preprocess_config
from skipkernels.ops.subset_ce import class_scores_topk
from skipkernels.train.run_folder import items_digest



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
    # the whole towers run: frozen prefix weights held in host memory come back for the pass
    on_device = getattr(tuner, "prefix_on_device", contextlib.nullcontext)
    with on_device(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
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


def class_labels(num_classes: int, classes: str) -> dict[str, list[int]]:
    """The test groups of ``classes`` (base2new, base, new or all) as ``{group: labels}``."""
    if classes == "all":  # no split: a one-class set has an "all" group too
        return {"all": list(range(num_classes))}
    base, new = base_new_labels(num_classes)
    labels = {"base": base, "new": new}
    return {group: labels[group] for group in (["base", "new"] if classes == "base2new" else [classes])}


def class_groups(splits: Splits, classes: str) -> dict[str, tuple[list, list[str]]]:
    """The test groups ``evaluate_groups`` scores, ``{group: (items, classnames)}`` from the test set
    of ``splits``: base and new for ``classes="base2new"``, else the one group base, new or all."""
    return {group: class_group(splits.test, splits.classnames, labels)
            for group, labels in class_labels(len(splits.classnames), classes).items()}


@dataclasses.dataclass
class EvalData:
    """What ``eval`` tests on: the split, whether it is the run's own data (then its test set is
    the one the run reported), and notes for the user."""
    splits: Splits
    own: bool
    notes: list[str]


def eval_data(data, dataset: str | None, shots: int | None = None, seed: int | None = None, run: dict | None = None,
              run_dir=None, checkpoint=None) -> EvalData:
    """The split ``eval`` tests on, for the run whose results.json is ``run`` (in folder ``run_dir``).

    On the run's own data (the folder it was trained on) the test set is the run's: an image
    folder's split is read from the run's ``split_zhou_<name>.json`` (so images added since do not
    move into it) or drawn again with the run's shots and seed; a ``shots`` or ``seed`` other than
    the run's is refused, since that split's test images can include the run's training images. The
    classes and test images must still be those the run was tested on (its identity's digests),
    else DatasetError says what changed. Elsewhere ``shots`` and ``seed`` (default: the run's, else
    16 and 1) draw an image folder's split."""
    run = run or {}
    identity = run.get("identity") or {}
    trained = run.get("train_config") or {}
    run_shots, run_seed = trained.get("shots"), trained.get("seed")
    notes = []
    given = [flag for flag, value in (("--shots", shots), ("--seed", seed)) if value is not None]
    # finetune's defaults (TrainConfig's), for an image folder's split without a run to follow
    from skipkernels.train.trainer import TrainConfig
    defaults = TrainConfig()
    if shots is None:
        shots = run_shots if run_shots is not None else defaults.shots
    if seed is None:
        seed = run_seed if run_seed is not None else defaults.seed
    other_draw = [f"--{flag} {value}" for flag, value, theirs in (("shots", shots, run_shots), ("seed", seed, run_seed))
                  if theirs is not None and value != theirs]
    name = resolve_folder(data, dataset)[0]
    same_path = bool(identity) and identity.get("data") == str(Path(data).expanduser().resolve()) \
        and identity.get("dataset") == name
    run_split = Path(run_dir) / f"split_zhou_{run.get('dataset')}.json" if run_dir and run.get("dataset") else None
    if run_split is not None and not run_split.is_file():
        run_split = None

    def refuse_other_draw(folder):
        raise DatasetError(f"{run_dir} was trained on {folder} with --shots {run_shots} --seed {run_seed}, and eval "
                           f"tests it on the held-out images of that split; {' '.join(other_draw)} draws another "
                           "split, whose test images are not the run's and can include its training images: leave "
                           "out --shots and --seed (or give the run's values)")

    if same_path and run_split is not None:  # the run's split as it was drawn, whatever the folder holds now
        if other_draw:
            refuse_other_draw(data)
        return EvalData(load_splits(run_split), True, notes)
    splits = load_splits(data, dataset, shots, seed)
    if not splits.generated:
        if given:
            notes.append(f"{data} brings its own split: {' and '.join(given)} "
                         f"{'change' if len(given) > 1 else 'changes'} nothing (they draw an image folder's split)")
        return _checked(EvalData(splits, same_path, notes), run, run_dir, data)
    if run_split is not None and not same_path:  # the same folder reached by another path
        run_splits = load_splits(run_split)
        trained_paths = {str(Path(it.path).resolve()) for it in run_splits.train}
        if any(str(Path(it.path).resolve()) in trained_paths for it in splits.test + splits.val + splits.train):
            if other_draw:
                refuse_other_draw(data)
            notes.append(f"{data} holds the training images of {run_dir}: testing on the run's split, {run_split}")
            return EvalData(run_splits, True, notes)
    if same_path and other_draw:
        refuse_other_draw(data)
    if checkpoint and not run:
        notes.append(f"{checkpoint} has no results.json beside it, so its run's split is unknown: {data} is split "
                     f"with --shots {shots} --seed {seed}; unless those are the run's, its test images can include "
                     "training images")
    return _checked(EvalData(splits, same_path, notes), run, run_dir, data)


def _checked(chosen: EvalData, run: dict, run_dir, data) -> EvalData:
    """On the run's own data, the classes and test images must be those the run was tested on."""
    if not chosen.own:
        return chosen
    splits = chosen.splits
    if run.get("classnames") and run["classnames"] != splits.classnames:
        raise DatasetError(f"{data} has other classes than {run_dir} was trained on ({len(splits.classnames)} now, "
                           f"{len(run['classnames'])} then), so its base and new halves are not the run's")
    tested = (run.get("identity") or {}).get("test_items") or {}
    groups = class_groups(splits, "all" if run.get("new_classes") == 0 else "base2new")
    for group, (items, names) in groups.items():
        if group in tested and tested[group] != items_digest(items, names):
            raise DatasetError(f"the {group} test images of {data} are not those {run_dir} was tested on: images "
                               "were added, removed or made unreadable since the run (or the folder is reached by "
                               "another path), so its training images could be among them")
    return chosen
