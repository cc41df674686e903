"""Classifying images with a tuned or pretrained CLIP: top-k classes and their probabilities.

``load_classifier`` rebuilds a model as the trainer evaluated it: from a ``finetune`` output
folder or its model.pt (the run's results.json names the model, tokenizer, mode and template; a
model.pt with PET modules or CoOp's context carries them and its own settings, see
``train.export``), from a plain open_clip state_dict, or from pretrained weights.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from skipkernels.data.coop import Item
from skipkernels.data.imagefolder import IMAGE_EXTENSIONS, image_files
from skipkernels.data.images import EvalTransform, ImageReadError, ItemDataset, make_loader, preprocess_config

DEFAULT_MODEL = "ViT-B-16"


def read_classnames(spec: str) -> list[str]:
    """Class names from a text file (one per line) or a comma-separated list."""
    path = Path(spec).expanduser()
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not names:
            raise ValueError(f"class file {path} lists no classes (one class name per line)")
    elif path.suffix in (".txt", ".csv") or os.sep in spec:
        raise FileNotFoundError(f"class file not found: {spec}")
    else:
        names = [name.strip() for name in spec.split(",") if name.strip()]
    if len(names) < 2:
        raise ValueError(f"at least two classes are needed to choose between, got {names}; give a file with "
                         "one class per line or a comma-separated list")
    return names


def run_classnames(checkpoint: str | None) -> list[str]:
    """The classes (base and new) of the run ``checkpoint`` belongs to: predict's default."""
    from skipkernels.models import read_tuned
    from skipkernels.train import run_folder
    path = Path(checkpoint).expanduser() if checkpoint else None
    source = None
    if path is not None and path.exists():
        source = run_folder.results_of(path) or (read_tuned(path) if path.is_file() else None)
    if source is None:
        raise ValueError("--classes is needed unless --checkpoint is a finetune output folder, its model.pt, or "
                         "a model.pt with PET modules or CoOp's context")
    names = source.get("classnames")
    if not names:
        raise ValueError(f"{checkpoint} lists no classes (written by an older version); pass --classes")
    return names


def run_of(checkpoint: str | None) -> tuple[dict, Path | None]:
    """(results.json, folder) of the run that ``checkpoint`` (a finetune folder or its model.pt)
    belongs to, or ({}, None): where eval takes the run's split and the classes evaluated from."""
    from skipkernels.train import run_folder
    path = Path(checkpoint).expanduser() if checkpoint else None
    results = (run_folder.results_of(path) if path is not None and path.exists() else None) or {}
    return results, (path if path.is_dir() else path.parent) if results else None


@contextlib.contextmanager
def plain_warnings(command: str):
    """Warnings printed as one line, ``skipkernels <command>: warning: <message>``: the user of a
    command needs what happened, not the file and line of the library that said it."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"skipkernels {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def collect_images(inputs) -> list[str]:
    """Image files named directly, and those found (recursively) in named folders, in order."""
    paths = []
    for entry in inputs:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
            paths.extend(str(p) for p in found)
        elif path.is_file():
            paths.append(str(path))
        else:
            raise FileNotFoundError(f"no such image or folder: {entry}")
    return paths


def _run_settings(run: Path) -> dict:
    results_path = run / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{run} is not a finetune output folder: it has no results.json")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    if not (run / "model.pt").is_file():
        raise FileNotFoundError(f"{run} has no model.pt: its training has not finished")
    return results


def _inference_config(config, tuned: dict | None, folder: Path | None):
    """The tuner config that evaluates a run of ``config``: plain inference (mode ft, the run's
    template) where every tuned weight is in open_clip's model; else the run's own mode, whose
    modules come from the tuned model.pt or, as earlier versions wrote them, a file beside it."""
    from skipkernels.skip.tuner import SkipConfig
    plan = config.plan
    if plan.trains in ("all", "suffix") or (plan.trains == "pet" and plan.pet_method == "lora"):
        return SkipConfig(mode="ft", template=config.template), None
    if tuned is not None:
        return config, None
    part = folder / ("prompt_learner.pt" if plan.trains == "prompt" else "pet.pt")
    if not part.is_file():
        raise FileNotFoundError(f"{folder / 'model.pt'} holds only open_clip's weights, but the run tuned "
                                f"{config.mode}'s modules, which {part} (missing) should hold: train the run "
                                "again to get a complete model.pt")
    return config, part


def _model_from_state_dict(name: str, state: dict, path, device, tokenizer):
    """Model ``name`` with the weights ``state`` (a tuned model.pt's), and its tokenizer."""
    from skipkernels.models import (HF_PREFIX, create_hf_model, load_state_dict, load_tokenizer, logging_disabled,
                                    open_clip_module)
    if name.startswith(HF_PREFIX):
        model, tokens = create_hf_model(name.removeprefix(HF_PREFIX), "none", device, tokenizer)
        load_state_dict(model, state, path, name)
        return model, tokens
    open_clip = open_clip_module()
    if name not in open_clip.list_models():
        raise ValueError(f"{path} was tuned from the open_clip model {name!r}, which this open_clip does not know")
    with logging_disabled(logging.WARNING):  # open_clip's "initialized randomly": the weights follow
        model = open_clip.create_model(name, pretrained=None, device=device)
    load_state_dict(model, state, path, name)
    return model, load_tokenizer(name, model, tokenizer)


def load_classifier(classnames, model_name: str | None = None, checkpoint: str | None = None,
                    pretrained: str | None = None, device="cpu", template: str | None = None,
                    tokenizer: str | None = None):
    """A SkipTuner in eval mode that scores ``classnames``. ``checkpoint``: a finetune output
    folder or a model.pt (the run's results.json beside it, or the tuned model.pt itself, gives the
    model name, tokenizer, template and tuned modules; see ``train.export``), or a plain
    state_dict of ``model_name``; else ``pretrained`` (an open_clip weight name or a path);
    neither: random weights. ``tokenizer``: a name or folder (see models.load_tokenizer), else the
    run's, else the model's own."""
    from skipkernels import checks
    from skipkernels.models import create_model
    from skipkernels.patch import patch_clip
    from skipkernels.skip.tuner import SkipConfig, SkipTuner
    from skipkernels.train import checkpoint as ckpt
    from skipkernels.models import read_tuned
    from skipkernels.train import run_folder

    classnames = checks.check_classnames("classnames", classnames)
    for name, value in (("model_name", model_name), ("pretrained", pretrained), ("template", template),
                        ("tokenizer", tokenizer)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a string or None, got {type(value).__name__} {value!r}"[:200])
    if checkpoint is not None:
        checks.check_path("checkpoint", checkpoint)
    if checkpoint and pretrained:  # the checkpoint holds every weight: pretrained would go unused
        raise ValueError(f"give either checkpoint (a tuned model; here {checkpoint}) or pretrained (weights to test "
                         f"zero-shot; here {pretrained}), not both")
    if template is not None and "{}" not in template:
        raise ValueError(f"template must contain {{}} for the class name, got {template!r}")
    device = checks.check_device("device", device)

    config, part, tuned = SkipConfig(mode="ft"), None, None  # plain inference: no class subsets, no caches
    weights = pretrained
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint} (a finetune --out folder or its model.pt)")
        if path.is_dir():
            _run_settings(path)
        weights_path = path / run_folder.MODEL_NAME if path.is_dir() else path
        tuned = read_tuned(weights_path)
        source = tuned if tuned is not None else run_folder.results_of(path)
        if source is not None:
            if model_name and model_name != source["model"]:
                raise ValueError(f"--model {model_name} differs from the model {source['model']} that {path} was "
                                 "tuned from; leave --model out to use the run's")
            model_name = source["model"]
            tokenizer = tokenizer or source.get("tokenizer")
            known = {f.name for f in dataclasses.fields(SkipConfig)}  # a run made before a field was dropped
            recorded = SkipConfig(**{k: v for k, v in source["skip_config"].items() if k in known})
            config, part = _inference_config(recorded, tuned, None if tuned is not None else weights_path.parent)
        weights = str(weights_path)
    if template is not None:
        if config.plan.trains == "prompt":  # it would be accepted and change nothing
            raise ValueError(f"template {template!r}: a CoOp model has no template to change, its prompts are its "
                             "learned context and the class name; leave the template out")
        config = dataclasses.replace(config, template=template)
    if tuned is not None:
        model, tokenizer = _model_from_state_dict(model_name, tuned["weights"], weights, device, tokenizer)
    else:
        try:
            model, tokenizer = create_model(model_name or DEFAULT_MODEL, weights, device=device, tokenizer=tokenizer)
        except ckpt.CheckpointError as err:
            if model_name is None and checkpoint:
                raise ckpt.CheckpointError(f"{err}; without --model, and without the run's results.json beside it, "
                                           f"the model is {DEFAULT_MODEL}: give the model it was tuned from as "
                                           "--model") from err
            raise
    patch_clip(model)
    tuner = SkipTuner(model, classnames, tokenizer, config)
    if tuner.pet is not None:
        tuner.pet.load_pet_state_dict(tuned["pet"] if tuned is not None else ckpt.load(part))
    if tuner.prompt_learner is not None:
        tuner.prompt_learner.load_state_dict(tuned["prompt_learner"] if tuned is not None else ckpt.load(part))
    tuner.eval()
    return tuner


@dataclasses.dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first


def predict(tuner, images, classnames, top_k: int = 5, batch_size: int = 64, workers: int = 0,
            autocast_dtype=None, progress: bool = True) -> list[Prediction]:
    """Top-k of softmax(exp(logit_scale) * cos(image, class prompt)) over ``classnames`` for each
    image path. Unreadable files are skipped with one warning that counts and names them; when
    none can be read, ImageReadError names them."""
    from skipkernels import checks
    if not hasattr(tuner, "encode_classes") or not hasattr(tuner, "encode_images"):
        raise TypeError(f"tuner must be a SkipTuner (e.g. from load_classifier), got {type(tuner).__name__}")
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(f"images must be a list of image paths, got the single path {str(images)!r}: pass "
                        f"[{str(images)!r}], or collect_images([folder]) for a folder")
    images = list(images)
    for path in images:
        checks.check_path("each image", path)
    classnames = checks.check_classnames("classnames", classnames)
    if not classnames:
        raise ValueError("classnames is empty: give the classes to choose between")
    checks.check_positive("top_k", top_k, integer=True)
    checks.check_positive("batch_size", batch_size, integer=True)
    checks.check_positive("workers", workers, integer=True, allow_zero=True)
    model, device = tuner.model, tuner.device
    size, mean, std = preprocess_config(model)
    items = [Item(path, -1, "") for path in images]
    loader = make_loader(ItemDataset(items, EvalTransform(size, mean, std), skip_unreadable=True), batch_size,
                         workers)
    k = min(top_k, len(classnames))
    out: list[Prediction] = []
    # no_grad as a block, not a decorator: the warning below then points at the caller, not at torch
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        text = tuner.encode_classes(classnames, normalize=True).float()
        scale = model.logit_scale.exp().float()
        for batch, _, indices in tqdm(loader, desc="predict", unit="batch", disable=not progress):
            if indices.numel() == 0:
                continue
            image_features = tuner.encode_images(batch.to(device), normalize=True).float()
            probs = (scale * image_features @ text.T).softmax(dim=-1)
            values, labels = probs.topk(k, dim=-1)
            for index, row_values, row_labels in zip(indices.tolist(), values.cpu().tolist(), labels.cpu().tolist()):
                out.append(Prediction(items[index].path, [(classnames[c], p) for c, p in zip(row_labels, row_values)]))
    if len(out) < len(items):
        read = {p.image for p in out}
        missing = [it.path for it in items if it.path not in read]
        named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        if not out:
            raise ImageReadError(f"none of the {len(items)} images could be read (not images, or damaged): {named}")
        warnings.warn(f"skipped {len(missing)} of the {len(items)} images, unreadable: {named}", stacklevel=2)
    return out


def format_predictions(predictions: list[Prediction], limit: int | None = None) -> str:
    """A table, one image a row; past ``limit`` rows only a count of the rest."""
    if not predictions:
        return "no predictions"
    k = len(predictions[0].top)
    header = ["image"] + [f"top {r + 1}" for r in range(k)]
    shown = predictions if limit is None else predictions[:limit]
    rows = [[p.image] + [f"{name} ({prob:.3f})" for name, prob in p.top] for p in shown]
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]
    lines.insert(1, "-" * len(lines[0]))
    if len(shown) < len(predictions):
        lines.append(f"... and {len(predictions) - len(shown)} more images")
    return "\n".join(lines)


def check_output_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out {path}: the file name must end in .csv or .json")
    return path


def write_predictions(predictions: list[Prediction], path) -> None:
    """``.json``: a list of {image, top: [{class, probability}]}; ``.csv``: one row per image
    and rank (image, rank, class, probability)."""
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        data = [{"image": p.image, "top": [{"class": name, "probability": prob} for name, prob in p.top]}
                for p in predictions]
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "rank", "class", "probability"])
        for p in predictions:
            for rank, (name, prob) in enumerate(p.top, 1):
                writer.writerow([p.image, rank, name, f"{prob:.6f}"])
