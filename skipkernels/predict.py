"""Classifying images with a tuned or pretrained CLIP: top-k classes and their probabilities.

``load_classifier`` rebuilds a model as the trainer evaluated it: from a ``finetune`` output
folder (its results.json names the model, mode, omega and template; PET modules and CoOp's context
are loaded from pet.pt / prompt_learner.pt beside model.pt), from a plain open_clip state_dict,
or from pretrained weights.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from skipkernels.data.coop import Item
from skipkernels.data.imagefolder import IMAGE_EXTENSIONS, image_files
from skipkernels.data.images import EvalTransform, ItemDataset, make_loader, preprocess_config

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
    """The classes (base and new) of the finetune folder ``checkpoint``: predict's default."""
    run = Path(checkpoint).expanduser() if checkpoint else None
    if run is None or not run.is_dir():
        raise ValueError("--classes is needed unless --checkpoint is a finetune output folder")
    names = _run_settings(run).get("classnames")
    if not names:
        raise ValueError(f"{run}/results.json lists no classes (written by an older version); pass --classes")
    return names


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


def load_classifier(classnames, model_name: str | None = None, checkpoint: str | None = None,
                    pretrained: str | None = None, device="cpu", template: str | None = None,
                    tokenizer: str | None = None):
    """A SkipTuner in eval mode that scores ``classnames``. ``checkpoint``: a finetune output
    folder or a model.pt state_dict; else ``pretrained`` (an open_clip weight name or a path);
    neither: random weights. ``tokenizer``: a name or folder (see models.load_tokenizer), else the model's own."""
    from skipkernels.models import create_model
    from skipkernels.patch import patch_clip
    from skipkernels.pet import PetConfig
    from skipkernels.skip.tuner import SkipConfig, SkipTuner
    from skipkernels.train import checkpoint as ckpt

    config = SkipConfig(mode="ft")  # plain inference: no class subsets, no caches
    run = Path(checkpoint).expanduser() if checkpoint else None
    if run is not None and not run.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (a finetune --out folder or its model.pt)")
    weights = str(run) if run else pretrained
    if run is not None and run.is_dir():
        results = _run_settings(run)
        if model_name and model_name != results["model"]:
            raise ValueError(f"--model {model_name} differs from the model {results['model']} that {run} tuned; "
                             "leave --model out to use the run's")
        model_name = results["model"]
        config = SkipConfig(**results["skip_config"])
        plan = config.plan
        if plan.trains in ("all", "suffix") or (plan.trains == "pet" and PetConfig(method=plan.pet_method).is_lora):
            # only PET modules and CoOp's context live outside model.pt (LoRA is folded into it)
            config = SkipConfig(mode="ft", template=config.template)
        weights = str(run / "model.pt")
    if template is not None:
        config = dataclasses.replace(config, template=template)
    model, tokenizer = create_model(model_name or DEFAULT_MODEL, weights, device=device, tokenizer=tokenizer)
    patch_clip(model)
    tuner = SkipTuner(model, classnames, tokenizer, config)
    if tuner.pet is not None:
        tuner.pet.load_pet_state_dict(ckpt.load(run / "pet.pt"))
    if tuner.prompt_learner is not None:
        tuner.prompt_learner.load_state_dict(ckpt.load(run / "prompt_learner.pt"))
    tuner.eval()
    return tuner


@dataclasses.dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first


@torch.no_grad()
def predict(tuner, images, classnames, top_k: int = 5, batch_size: int = 64, workers: int = 0,
            autocast_dtype=None, progress: bool = True) -> list[Prediction]:
    """Top-k of softmax(exp(logit_scale) * cos(image, class prompt)) over ``classnames`` for each
    image path. Unreadable files are skipped with one warning that names them."""
    model, device = tuner.model, tuner.device
    size, mean, std = preprocess_config(model)
    items = [Item(path, -1, "") for path in images]
    loader = make_loader(ItemDataset(items, EvalTransform(size, mean, std), skip_unreadable=True), batch_size,
                         workers)
    k = min(top_k, len(classnames))
    out: list[Prediction] = []
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
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
        warnings.warn(f"skipped {len(missing)} unreadable images: {', '.join(missing[:5])}", stacklevel=2)
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
