"""``finetune``: one whole run of the paper's protocol, from a dataset folder to a run folder.

The data (split, base and new classes, few-shot items), the model (patched, under the run's
policy), zero-shot and final evaluation, the ``Trainer``, and the outputs: model.pt
(``export``), results.json, metrics.csv and training.png, in the folder whose identity
``run_folder`` checks before any work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from skipkernels import distributed
from skipkernels._version import versions
from skipkernels.data.coop import load_splits, write_split_json
from skipkernels.data.fewshot import base_new_labels, sample_few_shot, subset_classes
from skipkernels.data.images import is_readable
from skipkernels.data.splits import Splits
from skipkernels.models import create_model, resolve_pretrained
from skipkernels.ops.policy import resolve as resolve_policy
from skipkernels.plots import training_chart, write_metrics_csv
from skipkernels.skip.tuner import SkipConfig, SkipTuner
from skipkernels.train import checkpoint, run_folder
from skipkernels.train.evaluate import class_groups, evaluate_groups
from skipkernels.train.export import export_model, fold_lora
from skipkernels.train.report import log_run_accuracies
from skipkernels.train.trainer import PEAK_MEMORY_KINDS, Trainer, TrainConfig, autocast_dtype_for


@contextlib.contextmanager
def _timed(times: dict, key: str):
    """``times[key]``: the seconds the block took."""
    start = time.perf_counter()
    yield
    times[key] = time.perf_counter() - start


@dataclasses.dataclass
class _RunData:
    """What a run trains and is tested on: the split, base and new labels, few-shot training items,
    and the test groups as ``(items, classnames)``: "base" and "new" for base-to-new, else "all"
    (``base`` then holds every label)."""
    splits: Splits
    base: list[int]
    new: list[int]
    train_items: list
    test_groups: dict

    @property
    def base_names(self) -> list[str]:
        return self.test_groups["base" if self.new else "all"][1]


def _run_data(data_root, dataset, train: TrainConfig, base_to_new: bool) -> _RunData:
    splits = load_splits(data_root, dataset, train.shots, train.seed)
    if base_to_new:
        base, new = base_new_labels(len(splits.classnames))
    else:
        base, new = list(range(len(splits.classnames))), []
    # an image folder's split is drawn from files already decoded once (data/imagefolder.py)
    readable = None if splits.generated else is_readable
    train_items = sample_few_shot(subset_classes(splits.train, base), train.shots, train.seed, readable=readable)
    test_groups = class_groups(splits, "base2new" if base_to_new else "all")
    return _RunData(splits, base, new, train_items, test_groups)


def _results(data: _RunData, model_name: str, pretrained, skip: SkipConfig, train: TrainConfig, tuner: SkipTuner,
             trainer: Trainer, finished: bool, resumed: bool, acc: dict, zero_shot_acc, times: dict,
             device, trainable_params: int) -> dict:
    """results.json: what was run, its accuracy (and gain over zero-shot), time, memory and history."""
    peak = trainer.peak_train_bytes
    return {
        "dataset": data.splits.name, "model": model_name, "pretrained": pretrained, "mode": skip.mode,
        "finished": finished, "resumed": resumed, "accuracy": acc, "time_s": times,
        "zero_shot_accuracy": zero_shot_acc,
        "gain": {k: acc[k] - zero_shot_acc[k] for k in acc} if zero_shot_acc and acc else None,
        "peak_train_memory_mb": None if peak is None else peak / 2**20,
        "peak_memory_kind": PEAK_MEMORY_KINDS[device.type] if peak is not None else "not measured",
        "cache_mb": trainer.cache_bytes / 2**20,
        "trainable_params": trainable_params,
        "exact_savings": tuner.savings,
        "prefix_offload": tuner.prefix_offload_state,  # frozen prefix weights between caching passes
        "step": str(trainer.step_choice),  # how each step ran, and why (train/step.py)
        "update": str(trainer.update_choice),  # where the optimizer update ran, and why
        "working_copies": str(trainer.working_copies_choice),  # whether autocast's weight casts were kept
        "class_subset": tuner.skipper.summary() if tuner.skipper is not None else None,
        "num_train_items": len(data.train_items), "base_classes": len(data.base), "new_classes": len(data.new),
        "classnames": data.splits.classnames,  # label order; base = the first base_classes
        "history": trainer.history, "device": str(device),
        # the tuner's config: skip_layers resolved from the model where it was left to the default
        "skip_config": dataclasses.asdict(tuner.config), "train_config": dataclasses.asdict(train),
        "versions": versions(),
        "world_size": distributed.world_size(),
    }


def _write_outputs(out_dir: Path, results: dict, tuner: SkipTuner, trainer: Trainer) -> None:
    """The tuned model (when finished; ``export.export_model``), results.json, metrics.csv and training.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if results["finished"]:
        export_model(tuner, out_dir / run_folder.MODEL_NAME, results["model"], results["tokenizer"],
                     results["classnames"])
    checkpoint.atomic_write_text(json.dumps(results, indent=2, default=str), out_dir / run_folder.RESULTS_NAME)
    write_metrics_csv(trainer.steps, out_dir / "metrics.csv")
    zero_shot_acc, acc = results["zero_shot_accuracy"], results["accuracy"]
    evaluations = ([{"epoch": 0, **zero_shot_acc}] if zero_shot_acc else []) + \
        [{"epoch": h["epoch"], **h["accuracy"]} for h in trainer.history if "accuracy" in h] + \
        ([{"epoch": len(trainer.history), **acc}] if acc else [])
    training_chart(trainer.steps, evaluations, out_dir / "training.png",
                   f"{results['model']}, {results['mode']}, {results['dataset']}")


def _check_arguments(data_root, dataset, model_name, pretrained, skip, train, out_dir, device, tokenizer):
    """``finetune``'s arguments, before any work: a TypeError or ValueError naming the one that is
    wrong. Returns ``device`` as a torch.device (None stays None)."""
    from skipkernels import checks
    checks.check_path("data_root", data_root)
    for name, value in (("dataset", dataset), ("pretrained", pretrained), ("tokenizer", tokenizer)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {type(value).__name__} {value!r}"[:200])
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be an open_clip model name (str), got {type(model_name).__name__}")
    if skip is not None and not isinstance(skip, SkipConfig):
        raise TypeError(f"skip must be a SkipConfig, got {type(skip).__name__}")
    if train is not None and not isinstance(train, TrainConfig):
        raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
    if out_dir is not None:
        checks.check_path("out_dir", out_dir)
    if device is not None:
        device = checks.check_device("device", device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
    return device


def _claim_folder(out_dir: Path, identity: dict, splits: Splits, resume: bool, zero_shot: bool) -> dict | None:
    """Before any work: ``out_dir`` holds this run or nothing. Returns the run's results where the
    folder holds it finished (nothing to do), else None: with ``resume`` the run goes on from what
    is there, without it the earlier run's files are removed. An image folder's drawn split is
    written beside the run."""
    if resume:
        done = run_folder.check(out_dir, identity)
        if done is not None:
            if distributed.is_main():
                # zero_shot is no part of the identity: say so where it asks for what the run lacks
                missing = "; --zero-shot is not applied: the run finished without a zero-shot evaluation" \
                    if zero_shot and not done.get("zero_shot_accuracy") else ""
                print(f"{out_dir} holds this run, finished: nothing to do (its results.json and model.pt are "
                      f"kept; --no-resume trains it again){missing}", file=sys.stderr)
            return done
    elif distributed.is_main():
        removed = run_folder.clear(out_dir)
        if removed:
            print(f"starting over in {out_dir}: removed the earlier run's {', '.join(removed)}", file=sys.stderr)
    distributed.barrier()
    if splits.generated and distributed.is_main():
        # the split drawn from a plain image folder; --data <this file> repeats the run exactly
        write_split_json(splits, out_dir / f"split_zhou_{splits.name}.json")
    return None


def _train(tuner: SkipTuner, data: _RunData, train: TrainConfig, out_dir: Path | None, model_name: str,
           identity: dict, resume: bool, evaluate) -> tuple[Trainer, bool]:
    """The run's Trainer, resumed from the folder's checkpoint where ``resume`` finds one, after
    training; and whether it resumed. ``evaluate(tuner, progress=...)``: the epochs' evaluation."""
    trainer = Trainer(tuner, data.train_items, train, out_dir, model_name=model_name,
                      evaluate=lambda: evaluate(tuner, progress=False), identity=identity)
    if distributed.is_main():
        print(f"step: {trainer.step_choice}", file=sys.stderr)
        print(f"optimizer update: {trainer.update_choice}", file=sys.stderr)
        print(f"weight working copies: {trainer.working_copies_choice}", file=sys.stderr)
        print(f"prefix weights between caching passes: {tuner.prefix_offload_state}", file=sys.stderr)
    resumed = trainer.resume() if resume else False
    if resumed and distributed.is_main():  # always, also without progress bars
        print(f"resuming from {trainer.checkpoint_path}: {trainer.start_epoch} of {train.epochs} epochs done "
              "(--no-resume starts over)", file=sys.stderr)
    trainer.train()
    return trainer, resumed


def finetune(data_root, dataset: str | None, model_name: str, pretrained: str | None = None,
             skip: SkipConfig | None = None, train: TrainConfig | None = None, out_dir=None,
             base_to_new: bool = True, device=None, resume: bool = True, model_seed: int = 0,
             tokenizer: str | None = None, zero_shot: bool = False, policy=None) -> dict:
    """The whole job: data, model, Skip Tuning (or a baseline), evaluation, results JSON, export.
    ``tokenizer``: a tokenizer folder or open_clip name (``skipkernels.models.load_tokenizer``).
    ``zero_shot``: also evaluate the model before training (results' zero_shot_accuracy, gain).
    ``policy``: the KernelPolicy (or backend name) of every op of the run (None: the ambient one)."""
    from skipkernels.patch import patch_clip

    device = _check_arguments(data_root, dataset, model_name, pretrained, skip, train, out_dir, device, tokenizer)
    pretrained = resolve_pretrained(model_name, pretrained)  # shipped weights by name: the run records their path
    skip = skip or SkipConfig()
    train = train or TrainConfig()
    device = distributed.init_from_env(device)
    if distributed.world_size() > 1 and not distributed.is_main():
        train = dataclasses.replace(train, progress=False)
    out_dir = Path(out_dir) if out_dir is not None else None
    times = {}

    data = _run_data(data_root, dataset, train, base_to_new)
    autocast_dtype = autocast_dtype_for(train.amp, device)
    identity = run_folder.run_identity(
        model=model_name, pretrained=pretrained, model_seed=model_seed, tokenizer=tokenizer, data_root=data_root,
        dataset=data.splits.name, base_to_new=base_to_new, train_items=data.train_items,
        test_groups=data.test_groups, skip=skip, train=train, policy=resolve_policy(policy),
        autocast_dtype=autocast_dtype, world_size=distributed.world_size())
    if out_dir is not None:
        done = _claim_folder(out_dir, identity, data.splits, resume, zero_shot)
        if done is not None:
            return done

    with _timed(times, "model"):
        model, tokenize = create_model(model_name, pretrained, device=device, seed=model_seed, tokenizer=tokenizer)
        patch_clip(model, policy=policy)

    def evaluate(tuner, progress=train.progress, prefix="eval"):
        return evaluate_groups(tuner, data.test_groups, train.eval_batch_size, train.workers, autocast_dtype,
                               progress, prefix)

    zero_shot_acc = None
    if zero_shot:  # the model before any update, with the plain template: the gain's baseline
        with _timed(times, "zero_shot_eval"):
            untrained = SkipTuner(model, data.base_names, tokenize, SkipConfig(mode="ft", template=skip.template))
            zero_shot_acc = evaluate(untrained, prefix="zero-shot")

    with _timed(times, "text_prefix"):
        tuner = SkipTuner(model, data.base_names, tokenize, skip, seed=train.seed)  # the run's one seed
    trainer, resumed = _train(tuner, data, train, out_dir, model_name, identity, resume, evaluate)
    times.update((key, trainer.times[key]) for key in ("cache", "train", "epoch_eval") if key in trainer.times)
    finished = len(trainer.history) >= train.epochs
    trainable_params = sum(p.numel() for _, p in tuner.trainable_named_parameters())
    if finished:
        fold_lora(tuner)  # the accuracy reported is that of the model exported

    with _timed(times, "eval"):
        acc = evaluate(tuner) if finished else {}

    results = _results(data, model_name, pretrained, skip, train, tuner, trainer, finished, resumed, acc,
                       zero_shot_acc, times, device, trainable_params)
    results["kernel_policy"] = dataclasses.asdict(resolve_policy(policy))
    results["tokenizer"] = tokenizer
    results["identity"] = identity  # how the weights in the folder were trained (run_folder)
    if out_dir is not None and distributed.is_main():
        _write_outputs(out_dir, results, tuner, trainer)
        log_run_accuracies(out_dir, train.report_to, zero_shot_acc, acc, len(trainer.steps))
    distributed.barrier()
    return results
