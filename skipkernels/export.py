"""Exporting a finetune run for use without skipkernels (``skipkernels export RUN --format ...``).

- ``open_clip``: a folder that ``open_clip.create_model_and_transforms("local-dir:PATH")`` loads
  (``open_clip_config.json``: the model and preprocessing configs; ``open_clip_model.safetensors``).
  Only where every tuned weight is one of open_clip's (skip, lskip, cskip, ft, LoRA folded): the
  modules of VL-PET and Adapter are nonlinear and CoOp's context is no weight, so folding them
  into open_clip's weights is not exact, and they are refused with that reason.
- ``hf``: ``save_pretrained`` of an ``hf:`` run's transformers model.
- ``classifier``: one module from preprocessed images (N, 3, S, S) to class logits (N, C), with
  the tuned class embeddings of a class list baked in: ``classifier.pt2`` (``torch.export``) or
  ``classifier.ts`` (TorchScript), and ``classifier.onnx``. ``preprocess.json`` beside them says
  how images become its input (size, mean, std, interpolation, resize and crop).

Every export folder holds ``provenance.json``: the run (folder, identity digest, mode, accuracy),
the model, the classes and the versions that wrote it. The ``check`` of each format loads what
was written and compares its logits with the run's, as skipkernels evaluates it
(``prediction.load_classifier``), within ``LOGIT_TOLERANCE``.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("open_clip", "hf", "classifier")
PROGRAMS = ("torch.export", "torchscript")
PROVENANCE_NAME = "provenance.json"
PREPROCESS_NAME = "preprocess.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
CLASSIFIER_FILES = {"torch.export": "classifier.pt2", "torchscript": "classifier.ts"}
ONNX_NAME = "classifier.onnx"
# Largest |logit difference| allowed between an export and the run, on logits exp(logit_scale)·cos
# (at most 100): fp32 with reordered reductions (fused attention, onnxruntime's kernels) differs by
# about 1e-5 of the scale; 1e-3 absolute leaves margin and still catches any wrong weight or class.
LOGIT_TOLERANCE = 1e-3


class ExportError(ValueError):
    """A run that cannot be exported in the format asked, with the reason."""


class ImageClassifier(nn.Module):
    """Images -> exp(logit_scale) · cos(image feature, class embedding) for baked class embeddings."""

    def __init__(self, image_encoder: nn.Module, class_embeddings: torch.Tensor, logit_scale: torch.Tensor):
        super().__init__()
        self.image_encoder = image_encoder
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.detach().float(), dim=-1))
        self.register_buffer("logit_scale", logit_scale.detach().float().exp().reshape(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.image_encoder(images).float()
        features = features / features.norm(dim=-1, keepdim=True)
        return self.logit_scale * features @ self.class_embeddings.t()


class TunerImageTower(nn.Module):
    """The tuner's image tower (PET modules and hf: models included) as a module of images."""

    def __init__(self, tuner):
        super().__init__()
        self.tuner = tuner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tuner.towers.image.encode(images, self.tuner.prune_image)


class _OpenClipImages(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


# ---------------------------------------------------------------------------------------- the run
def read_run(run) -> tuple[Path, dict]:
    """(folder, results.json) of a finished finetune run given as its folder or its model.pt."""
    path = Path(run).expanduser()
    folder = path.parent if path.is_file() else path
    results_path = folder / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{run} is not a finetune output folder (no results.json)")
    if not (folder / "model.pt").is_file():
        raise FileNotFoundError(f"{folder} has no model.pt: its training has not finished")
    return folder, json.loads(results_path.read_text(encoding="utf-8"))


def provenance(folder: Path, results: dict, fmt: str, classnames, **extra) -> dict:
    from skipkernels._version import versions
    identity = str(results.get("identity", ""))
    return {
        "format": fmt, "run": str(folder.resolve()),
        "run_identity_sha256": hashlib.sha256(identity.encode()).hexdigest(),
        "model_pt_sha256": _file_sha256(folder / "model.pt"),
        "model": results.get("model"), "pretrained": results.get("pretrained"), "mode": results.get("mode"),
        "dataset": results.get("dataset"), "accuracy": results.get("accuracy"),
        "classes": list(classnames), "versions": versions(), "run_versions": results.get("versions"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra,
    }


def _file_sha256(path: Path) -> str:
    from skipkernels.train.run_folder import file_sha256
    return file_sha256(path)


def _write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _preprocess(model) -> dict:
    from skipkernels.data.images import preprocess_config
    size, mean, std = preprocess_config(model)
    # skipkernels' evaluation (data.images.EvalTransform): shorter side to size, bicubic, centre crop
    return {"size": size, "mean": list(mean), "std": list(std), "interpolation": "bicubic",
            "resize_mode": "shortest", "crop": "center", "input": "RGB float in [0, 1], then (x - mean) / std",
            "layout": "NCHW"}


def run_logits(tuner, classnames, images: torch.Tensor) -> torch.Tensor:
    """The run's logits, as ``predict`` computes them."""
    with torch.no_grad():
        text = tuner.encode_classes(list(classnames), normalize=True).float()
        image = tuner.encode_images(images, normalize=True).float()
        return tuner.model.logit_scale.exp().float() * image @ text.T


def _check_close(name: str, got: torch.Tensor, expected: torch.Tensor) -> float:
    error = float((got.float() - expected.float()).abs().max())
    if not math.isfinite(error) or error > LOGIT_TOLERANCE:
        raise AssertionError(f"{name}: logits differ from the run's by {error:.3g} (allowed {LOGIT_TOLERANCE})")
    return error


def example_images(tuner, count: int = 2, seed: int = 0) -> torch.Tensor:
    from skipkernels.data.images import preprocess_config
    size = preprocess_config(tuner.model)[0]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _refuse_unfoldable(results: dict, fmt: str) -> None:
    """ExportError where the run's mode tuned parts that open_clip's (or transformers') model has no
    place for: CoOp's context, PET modules other than LoRA (folded into the weights it adapts).
    Read from results.json, before model.pt is opened."""
    from skipkernels.skip.modes import mode_plan
    mode = results.get("mode")
    plan = mode_plan(mode, None)
    if plan.trains != "prompt" and (plan.trains != "pet" or plan.pet_method == "lora"):
        return
    what = ("CoOp's learned context is no weight of the model: it is an input of the text tower"
            if plan.trains == "prompt" else
            f"{mode}'s modules are nonlinear (GELU, sigmoid gates) and sit between the model's layers, so no "
            "change of open_clip's weights computes them")
    raise ExportError(f"{results.get('model')} tuned with {mode} cannot be exported as {fmt}: {what}. "
                      "--format classifier exports it exactly, with the class embeddings baked in")


# ------------------------------------------------------------------------------------- formats
def export_open_clip(folder: Path, results: dict, out: Path, check: bool = True) -> dict:
    from safetensors.torch import save_file

    from skipkernels.models import HF_PREFIX, open_clip_module
    from skipkernels.prediction import load_classifier
    name = results["model"]
    if name.startswith(HF_PREFIX):
        raise ExportError(f"{name} is a transformers model, not an open_clip one: use --format hf")
    _refuse_unfoldable(results, "open_clip")
    open_clip = open_clip_module()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ExportError(f"open_clip has no config for {name}")
    classnames = results["classnames"]
    tuner = load_classifier(classnames, checkpoint=str(folder))  # model.pt's weights, read once
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage (tied weights): each is written as its own copy
    save_file({k: v.detach().contiguous().clone() for k, v in tuner.model.state_dict().items()},
              str(out / OPEN_CLIP_WEIGHTS))
    preprocess = _preprocess(tuner.model)
    _write_json({"model_cfg": model_cfg,
                 "preprocess_cfg": {k: preprocess[k] for k in ("size", "mean", "std", "interpolation", "resize_mode")}},
                out / "open_clip_config.json")
    record = provenance(folder, results, "open_clip", classnames, template=tuner.config.template,
                        load=f'open_clip.create_model_and_transforms("local-dir:{out.resolve()}")')
    if check:
        images = example_images(tuner)
        model = open_clip.create_model(f"local-dir:{out}")
        model.eval()
        tokens = tuner.tokenizer([tuner.config.template.format(c) for c in classnames])
        with torch.no_grad():
            text = F.normalize(model.encode_text(tokens).float(), dim=-1)
            image = F.normalize(model.encode_image(images).float(), dim=-1)
            logits = model.logit_scale.exp() * image @ text.T
        record["checked_max_abs_logit_error"] = _check_close("open_clip", logits,
                                                             run_logits(tuner, classnames, images))
    _write_json(record, out / PROVENANCE_NAME)
    return record


def export_hf(folder: Path, results: dict, out: Path, check: bool = True) -> dict:
    from skipkernels.models import HF_PREFIX, import_transformers
    from skipkernels.prediction import load_classifier
    name = results["model"]
    if not name.startswith(HF_PREFIX):
        raise ExportError(f"{name} is an open_clip model: use --format open_clip (save_pretrained is transformers')")
    _refuse_unfoldable(results, "hf")
    classnames = results["classnames"]
    tuner = load_classifier(classnames, checkpoint=str(folder))  # model.pt's weights, read once
    transformers = import_transformers(name.removeprefix(HF_PREFIX))  # says how to install it where missing
    config = transformers.AutoConfig.from_pretrained(name.removeprefix(HF_PREFIX))
    model = getattr(transformers, type(tuner.model).__name__)(config)
    model.load_state_dict(tuner.model.state_dict())
    model.save_pretrained(out)
    try:  # the tokenizer the run used, so that the folder is complete
        transformers.AutoTokenizer.from_pretrained(results.get("tokenizer") or name.removeprefix(HF_PREFIX)) \
            .save_pretrained(out)
    except (OSError, ValueError):  # a hub tokenizer out of reach: the weights are still the export
        pass
    record = provenance(folder, results, "hf", classnames, template=tuner.config.template,
                        load=f"transformers.{type(model).__name__}.from_pretrained({str(out.resolve())!r})")
    if check:
        images = example_images(tuner)
        loaded = getattr(transformers, type(model).__name__).from_pretrained(out).eval()
        tokens = tuner.tokenizer([tuner.config.template.format(c) for c in classnames])
        with torch.no_grad():
            image = F.normalize(_pooled(loaded.get_image_features(pixel_values=images)).float(), dim=-1)
            text = F.normalize(_pooled(loaded.get_text_features(input_ids=tokens)).float(), dim=-1)
            logits = loaded.logit_scale.exp() * image @ text.T
        record["checked_max_abs_logit_error"] = _check_close("hf", logits, run_logits(tuner, classnames, images))
    _write_json(record, out / PROVENANCE_NAME)
    return record


def _pooled(features):
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def classifier_module(tuner, classnames, model_name: str | None = None) -> ImageClassifier:
    """The run's classifier over ``classnames``: a plain open_clip model's image tower where the
    tuned model is one and ``model_name`` names its open_clip config (skipkernels' routed blocks
    then stay out of the exported graph), else the tuner's."""
    from skipkernels.models import HF_PREFIX, open_clip_module
    tuner.restore_prefix()  # the exported image tower runs whole: no weight of it may be off the device
    with torch.no_grad():
        text = tuner.encode_classes(list(classnames), normalize=True).float().cpu()
    plain = tuner.pet is None and hasattr(tuner.model, "visual") and hasattr(tuner.model, "encode_image")
    encoder = TunerImageTower(tuner)
    if plain and model_name and not model_name.startswith(HF_PREFIX):
        model = open_clip_module().create_model(model_name, pretrained=None)
        model.load_state_dict(tuner.model.state_dict())
        encoder = _OpenClipImages(model.eval())
    return ImageClassifier(encoder, text, tuner.model.logit_scale).eval()


def export_classifier(folder: Path, results: dict, out: Path, classnames=None, program: str = "torch.export",
                      onnx: bool = True, check: bool = True) -> dict:
    from skipkernels.prediction import load_classifier
    if program not in PROGRAMS:
        raise ValueError(f"program {program!r}: one of {', '.join(PROGRAMS)}")
    if onnx:
        missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
        if missing:
            raise ExportError(f"classifier.onnx needs {' and '.join(missing)}, not installed: "
                              "pip install 'skipkernels[export]', or export without ONNX (--no-onnx)")
    classnames = list(classnames or results["classnames"])
    tuner = load_classifier(classnames, checkpoint=str(folder))
    module = classifier_module(tuner, classnames, results["model"])
    images = example_images(tuner)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CLASSIFIER_FILES[program]
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own deprecation notices from inside torch.export: nothing the user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch|copyreg")
        if program == "torch.export":
            program_obj = torch.export.export(module, (images,), dynamic_shapes=({0: batch},))
            torch.export.save(program_obj, str(path))
        else:
            torch.jit.save(torch.jit.trace(module, (images,), check_trace=False), str(path))
    files = [path.name]
    preprocess = _preprocess(tuner.model)
    _write_json(preprocess, out / PREPROCESS_NAME)
    (out / "classes.txt").write_text("\n".join(classnames) + "\n", encoding="utf-8")
    record = provenance(folder, results, "classifier", classnames, program=program,
                        input={"shape": ["N", 3, preprocess["size"], preprocess["size"]], "dtype": "float32"},
                        output={"shape": ["N", len(classnames)], "meaning": "exp(logit_scale) * cosine similarity; "
                                "softmax gives class probabilities"},
                        template=None if tuner.prompt_learner is not None else tuner.config.template)
    if onnx:
        write_onnx(module, images, out / ONNX_NAME)
        files.append(ONNX_NAME)
    record["files"] = files + [PREPROCESS_NAME, "classes.txt"]
    if check:
        expected = run_logits(tuner, classnames, images)
        with torch.no_grad():
            logits = load_program(path)(images)
        record["checked_max_abs_logit_error"] = {program: _check_close(program, logits, expected)}
        if onnx:
            try:
                logits = onnx_logits(out / ONNX_NAME, images)
            except ImportError as err:
                record["checked_max_abs_logit_error"]["onnxruntime"] = f"not checked: {err}"
            else:
                record["checked_max_abs_logit_error"]["onnxruntime"] = _check_close("onnxruntime", logits, expected)
    _write_json(record, out / PROVENANCE_NAME)
    return record


def write_onnx(module: nn.Module, images: torch.Tensor, path) -> None:
    """``module`` (images -> logits) as one ONNX file, any batch size, inputs "images", outputs "logits"."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch|copyreg")
        torch.onnx.export(module, (images,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)


def load_program(path) -> nn.Module:
    """An exported classifier (``classifier.pt2`` or ``classifier.ts``) as a callable module."""
    path = Path(path)
    if path.suffix == ".ts":
        return torch.jit.load(str(path)).eval()
    return torch.export.load(str(path)).module()


def onnx_logits(path, images: torch.Tensor) -> torch.Tensor:
    """``classifier.onnx``'s logits of ``images`` under onnxruntime on CPU (ImportError without it)."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("onnxruntime is not installed (pip install 'skipkernels[export]')") from err
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": images.detach().cpu().float().numpy()})
    return torch.from_numpy(logits)


def export_run(run, out, fmt: str, classnames=None, program: str = "torch.export", onnx: bool = True,
               check: bool = True) -> dict:
    """Export the finetune run ``run`` (its folder or model.pt) into folder ``out`` as ``fmt``
    (``FORMATS``); returns the provenance record written beside it. ``classnames`` (classifier
    only): the classes to bake in, else the run's. ``check``: load what was written and compare
    its logits with the run's (AssertionError beyond ``LOGIT_TOLERANCE``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: one of {', '.join(FORMATS)}")
    if classnames is not None and fmt != "classifier":
        raise ValueError(f"classes are baked in only by --format classifier; {fmt} keeps the whole text tower")
    folder, results = read_run(run)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / PROVENANCE_NAME).is_file():
        raise ExportError(f"{out} holds files that no export wrote: give an empty or new folder")
    if fmt == "open_clip":
        return export_open_clip(folder, results, out, check)
    if fmt == "hf":
        out.mkdir(parents=True, exist_ok=True)
        return export_hf(folder, results, out, check)
    return export_classifier(folder, results, out, classnames, program, onnx, check)


# ------------------------------------------------------------------------------ the command line
def add_arguments(p) -> None:
    p.add_argument("run", help="a finetune output folder (or its model.pt)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="open_clip: a folder for open_clip's local-dir:PATH; hf: save_pretrained of an hf: run; "
                        "classifier: images -> class logits with the class embeddings baked in, and ONNX")
    p.add_argument("--out", required=True, help="the export folder (new, empty, or an earlier export's)")
    p.add_argument("--classes", default=None, help="classifier: a text file with one class per line, or a "
                                                   "comma-separated list (default: the run's classes)")
    p.add_argument("--program", choices=PROGRAMS, default="torch.export",
                   help="classifier: torch.export (classifier.pt2) or TorchScript (classifier.ts)")
    p.add_argument("--no-onnx", action="store_true", help="classifier: no classifier.onnx")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading what was written and comparing its logits with the run's")


def command(args) -> int:
    from skipkernels.prediction import plain_warnings, read_classnames
    classnames = read_classnames(args.classes) if args.classes else None
    with plain_warnings("export"):
        record = export_run(args.run, args.out, args.format, classnames, args.program, onnx=not args.no_onnx,
                            check=not args.no_check)
    out = Path(args.out)
    for name in sorted(p.name for p in out.iterdir()):
        print(f"saved: {out / name}")
    if "checked_max_abs_logit_error" in record:
        print(f"checked: largest logit difference from the run {record['checked_max_abs_logit_error']} "
              f"(allowed {LOGIT_TOLERANCE})")
    return 0
