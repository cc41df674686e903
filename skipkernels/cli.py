"""The ``skipkernels`` command: finetune, eval, demo, info."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from skipkernels._version import __version__
from skipkernels.flags import DEVICE_HELP, MODEL_HELP, NO_PROGRESS_HELP, note_top_ratio_count, positive_int
from skipkernels.flags import check_training_flags as _check_finetune_flags
from skipkernels.flags import flag_device as _device
from skipkernels.flags import kernel_policy as _policy

# The demo: the paper's base-to-new protocol on the compositional shapes set, from the embedded
# pretrained tiny CLIP (skipkernels/pretrain_tiny.py). Its new classes are colour-shape pairs the
# pretraining never saw. It keeps the paper's 20 epochs, but the paper's batches of one class and
# lr 2e-5 are made for ViT-B/16; for this small model the demo uses mixed-class batches of 8 and
# lr 3e-3, the same for every mode.
DEMO = {"model": "skipkernels-tiny-shapes", "dataset": "shapes", "skip_layers": 2, "epochs": 20, "lr": 3e-3,
        "shots": 16, "batch_size": 8, "same_class_batches": False,
        "eval_every": 4}  # eval_every: the accuracy curve in training.png
DEMO_MODES = "ft,coop,skip"


PREDICT_ROWS_SHOWN = 20  # rows printed by predict when --out holds them all
# What an interrupted command leaves behind, where it leaves something to go on from.
INTERRUPTED = {
    "finetune": "; the checkpoint of the last finished epoch, if any, is kept: the same command without "
                "--no-resume resumes from it",
    "reproduce": "; finished runs, and each unfinished run's last finished epoch, are kept: the same command "
                 "without --no-resume goes on from them",
}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """The flags of SkipConfig's and TrainConfig's fields (skipkernels.options), and --protocol-epochs."""
    from skipkernels.options import add_options
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.trainer import TrainConfig
    from skipkernels.ops.policy import KernelPolicy
    add_options(p, SkipConfig)
    add_options(p, TrainConfig)
    add_options(p, KernelPolicy)
    p.add_argument("--protocol-epochs", action="store_true",
                   help="divide --epochs by 4 for ImageNet, SUN397 and Food101 as the paper does")


def _add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer: a folder with a Hugging Face tokenizer (or an open_clip hub snapshot), or an "
                        "open_clip model name whose tokenizer to use (default: the model's own; SigLIP's is "
                        "fetched from the Hugging Face hub or, with HF_HUB_OFFLINE=1, its local cache; the "
                        "shipped skipkernels-tiny* configs': open_clip's BPE tokenizer)")


def _protocol_dataset(args) -> str:
    """The standard dataset name --protocol-epochs reads: --dataset's, else that of the CoOp
    folder or split file that --data names."""
    from skipkernels.data.coop import STANDARD_DATASETS
    if args.dataset is None and args.data is None:
        return "synthetic"
    given = (args.dataset or Path(args.data).expanduser().name).lower()
    key = given.replace("-", "_")
    return next((name for name, spec in STANDARD_DATASETS.items()
                 if key == name or given in (spec.folder.lower(), (spec.split_file or "").lower())), key)


def _configs(args):
    from skipkernels.options import from_args
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.trainer import TrainConfig, protocol_epochs
    note_top_ratio_count(args)
    skip = from_args(SkipConfig, args)
    epochs = protocol_epochs(_protocol_dataset(args), args.epochs) if args.protocol_epochs else args.epochs
    return skip, from_args(TrainConfig, args, epochs=epochs)


def cmd_finetune(args) -> int:
    from skipkernels.data.synthetic import ensure_synthetic
    from skipkernels.train.job import finetune
    skip, train = _configs(args)
    policy = _policy(args, train)
    _check_finetune_flags(args, train, policy)
    data = args.data
    if data is None:
        data, args.dataset = ensure_synthetic(), "synthetic"
    results = finetune(data, args.dataset, args.model, args.pretrained, skip, train, args.out,
                       base_to_new=not args.all_classes, device=args.device, resume=not args.no_resume,
                       tokenizer=args.tokenizer, zero_shot=args.zero_shot, policy=policy)
    from skipkernels import distributed
    if distributed.is_main():  # once per job: results.json holds the main rank's numbers
        print(json.dumps({"accuracy": results["accuracy"], "zero_shot_accuracy": results["zero_shot_accuracy"],
                          "gain": results["gain"], "time_s": results["time_s"],
                          "peak_train_memory_mb": results["peak_train_memory_mb"],
                          "exact_savings": results["exact_savings"]}, indent=2))
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _weights_note(args) -> None:
    """Refuse two sources of weights; say on stderr that the model has random weights, where it
    has: a model evaluated by mistake without weights otherwise only shows as chance accuracy."""
    from skipkernels.models import HF_PREFIX, RANDOM_WEIGHTS, SHIPPED_WEIGHTS
    from skipkernels.prediction import DEFAULT_MODEL
    if args.checkpoint and args.pretrained:  # the checkpoint holds every weight: --pretrained would go unused
        raise ValueError(f"--checkpoint {args.checkpoint} and --pretrained {args.pretrained} both give the weights: "
                         "give --checkpoint for a tuned model, or --pretrained to test weights zero-shot")
    if args.checkpoint:
        return
    model = args.model or DEFAULT_MODEL
    if args.pretrained == RANDOM_WEIGHTS:
        print(f"note: --pretrained {RANDOM_WEIGHTS}: {model} has random weights", file=sys.stderr)
    elif not args.pretrained and not model.startswith(HF_PREFIX) and model not in SHIPPED_WEIGHTS:
        # a hf: model loads its folder's (or the hub's) weights; a shipped model its shipped ones
        print(f"note: neither --checkpoint nor --pretrained given: {model} has random weights", file=sys.stderr)


def cmd_eval(args) -> int:
    from skipkernels.prediction import load_classifier, plain_warnings, run_of
    from skipkernels.train.evaluate import class_groups, eval_data, evaluate_groups
    from skipkernels.train.trainer import autocast_dtype_for
    device = _device(args.device)
    _weights_note(args)
    run, run_dir = run_of(args.checkpoint)  # the split and classes of the run, where not given
    with plain_warnings("eval"):
        chosen = eval_data(args.data, args.dataset, args.shots, args.seed, run, run_dir, args.checkpoint)
        for note in chosen.notes:
            print(f"note: {note}", file=sys.stderr)
        trained_on_all = run.get("new_classes") == 0
        classes = args.classes or ("all" if trained_on_all else "base2new")
        if chosen.own and trained_on_all and classes in ("base2new", "new"):
            raise ValueError(f"{run_dir} was trained on all classes of {args.data}, so none of them is new to it: "
                             "use --classes all (or base)")
        splits = chosen.splits
        groups = class_groups(splits, classes)
        tuner = load_classifier(splits.classnames, args.model, args.checkpoint, args.pretrained, device,
                                args.template, tokenizer=args.tokenizer)
        out = evaluate_groups(tuner, groups, autocast_dtype=autocast_dtype_for("auto", device),
                              progress=not args.no_progress)
    print(json.dumps(out, indent=2))
    return 0


def cmd_predict(args) -> int:
    from skipkernels.prediction import (check_output_path, collect_images, format_predictions, load_classifier,
                                     plain_warnings, predict, read_classnames, run_classnames, write_predictions)
    from skipkernels.train.trainer import autocast_dtype_for
    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    for path in args.out:  # before any work
        check_output_path(path)
    classnames = read_classnames(args.classes) if args.classes else run_classnames(args.checkpoint)
    images = collect_images(args.images)
    device = _device(args.device)
    _weights_note(args)
    with plain_warnings("predict"):  # e.g. the unreadable images skipped: counted and named on one line
        tuner = load_classifier(classnames, args.model, args.checkpoint, args.pretrained, device, args.template,
                                tokenizer=args.tokenizer)
        predictions = predict(tuner, images, classnames, args.top_k, args.batch_size, args.workers,
                              autocast_dtype_for("auto", device), progress=not args.no_progress)
    # with files written, the terminal gets a sample; without, every row
    print(format_predictions(predictions, limit=PREDICT_ROWS_SHOWN if args.out else None))
    for path in args.out:
        write_predictions(predictions, path)
        print(f"saved: {path}")
    return 0


def _megabytes(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _format_table(rows: list[dict]) -> str:
    width = max([len("zero-shot")] + [len(r["mode"]) for r in rows])  # the longest mode name fits
    header = f"{'mode':<{width}} {'base %':>7} {'new %':>7} {'HM':>7} {'train s':>8} {'cache s':>8} " \
             f"{'peak MB':>8} {'trainable':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        a = r["accuracy"]
        lines.append(f"{r['mode']:<{width}} {a.get('base', 0):7.2f} {a.get('new', 0):7.2f} {a.get('hm', 0):7.2f} "
                     f"{r['time_s']['train']:8.2f} {r['time_s'].get('cache', 0):8.2f} "
                     f"{_megabytes(r['peak_train_memory_mb']):>8} {r['trainable_params']:10,d}")
    return "\n".join(lines)


def demo_rows(results: list[dict]) -> list[dict]:
    """The demo's table rows: the model before training (from the first run's zero-shot
    evaluation, which costs no training) followed by each run."""
    zero_shot = next((r["zero_shot_accuracy"] for r in results if r.get("zero_shot_accuracy")), None)
    if zero_shot is None:
        raise ValueError("no run evaluated the model before training (finetune(..., zero_shot=True))")
    before = {"mode": "zero-shot", "accuracy": zero_shot, "time_s": {"train": 0.0, "cache": 0.0},
              "peak_train_memory_mb": None, "trainable_params": 0}
    return [before] + results


def _demo_chart(rows: list[dict], path: Path) -> bool:
    """The comparison at a glance: accuracy against what it cost, one bar per mode."""
    from skipkernels.plots import bar_chart

    def per_mode(value):
        return {r["mode"]: value(r) for r in rows}

    panels = [("HM % (zero-shot HM as a line)", per_mode(lambda r: r["accuracy"].get("hm", 0.0))),
              ("train s (+ LSkip cache s)", per_mode(lambda r: r["time_s"]["train"] + r["time_s"].get("cache", 0.0))),
              ("trainable parameters (M)", per_mode(lambda r: r["trainable_params"] / 1e6))]
    if all(r["peak_train_memory_mb"] is not None for r in rows):
        panels.insert(2, ("peak training memory (MB)", per_mode(lambda r: r["peak_train_memory_mb"])))
    zero_shot = (rows[0].get("zero_shot_accuracy") or {}).get("hm")
    return bar_chart(panels, path, f"Skip Tuning and the baselines: {rows[0]['dataset']}, {rows[0]['model']}, "
                                   f"{rows[0]['device']}", reference_line=(0, zero_shot))


def cmd_demo(args) -> int:
    import torch
    from skipkernels.data.shapes import ensure_shapes
    from skipkernels.pretrain_tiny import WEIGHTS
    from skipkernels.skip.tuner import MODES, SkipConfig
    from skipkernels.train.trainer import TrainConfig
    from skipkernels.train.job import finetune
    _device(args.device)
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:  # before the first mode trains
        raise ValueError(f"--modes: {unknown[0]!r} is not a mode; choose from {', '.join(MODES)}")
    root = ensure_shapes()
    print(f"shapes dataset: {root / DEMO['dataset']} (12 colour-shape classes; base = first 6, new = last 6, "
          "none of the new ones seen in pretraining)")
    epochs = args.epochs
    print(f"model: {DEMO['model']} pretrained ({WEIGHTS.name}), omega = {DEMO['skip_layers']}, {epochs} "
          f"epochs, {DEMO['shots']} shots, mixed-class batches of {DEMO['batch_size']}, lr {DEMO['lr']}")
    results = []
    for mode in modes:
        start = time.perf_counter()
        skip = SkipConfig(mode=mode, skip_layers=DEMO["skip_layers"])
        train = TrainConfig(epochs=epochs, batch_size=DEMO["batch_size"], lr=DEMO["lr"],
                            lr_image=DEMO["lr"], shots=DEMO["shots"], same_class_batches=DEMO["same_class_batches"],
                            warmup_epochs=0, seed=args.seed, eval_every=DEMO["eval_every"],
                            progress=not args.no_progress)
        out = Path(args.out) / mode
        result = finetune(root, DEMO["dataset"], DEMO["model"], str(WEIGHTS), skip, train, out,
                          device=args.device, resume=False,
                          zero_shot=not results)  # once: every run starts from the same weights
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
    table = _format_table(demo_rows(results))
    print()
    print(table)
    device = results[0]["device"]
    kind = results[0]["peak_memory_kind"]
    print(f"\ndevice: {device}; train s excludes LSkip caching (cache s); peak MB during training: {kind}")
    summary = {"demo": DEMO, "rows": results, "table": table}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"saved: {Path(args.out) / 'demo.json'}")
    if _demo_chart(results, Path(args.out) / "demo.png"):
        print(f"saved: {Path(args.out) / 'demo.png'} (each run's curves: {Path(args.out)}/<mode>/training.png)")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 0


def cmd_bench(args) -> int:
    from skipkernels import bench
    _device(args.device)
    if args.inference:  # image -> logits latency per method
        from skipkernels import bench_inference
        bench_inference.run(args)
        return 0
    if args.classes and len(args.classes) > 1:  # training cost against the class count
        from skipkernels import bench_classes
        bench_classes.run(args)
        return 0
    bench.run(args)
    return 0


def cmd_info(args) -> int:
    import skipkernels
    data = skipkernels.info()
    if args.model:
        data["model"] = model_info(args.model)
        print(f"\n{args.model} (random weights):")
        for key, value in data["model"].items():
            print(f"  {key}:" + "".join(f"\n    {line}" for line in value) if isinstance(value, list) else
                  f"  {key}: {value}")
    if args.json:
        print(json.dumps(data, indent=2))
    return 0


def cmd_reproduce(args) -> int:
    from skipkernels.reproduce.command import run
    return run(args)


def cmd_build(args) -> int:
    """Compile the ops now, for the running torch, into the cache (or report the installed _C)."""
    if args.cache:
        os.environ["SKIPKERNELS_CACHE"] = args.cache
    os.environ["SKIPKERNELS_JIT"] = "1"  # asked for explicitly: SKIPKERNELS_JIT=0 is about first use
    from skipkernels import _ext
    error = _ext.load(force=True)
    if error:
        print(f"skipkernels build: error: {error}", file=sys.stderr)
        return 1
    state = _ext.status()
    print(f"compiled ops ({', '.join(sorted(_ext.COMPILED_OPS))}; CUDA: {_ext.CUDA_BUILT}): "
          f"{state['state']} at {state['detail']}")
    return 0


def model_info(name: str) -> dict:
    """The towers skipkernels sees in open_clip model ``name``, which exact savings apply, and the
    plan: per block, what each sub-layer runs under the default policy and why."""
    from skipkernels.families import model_towers
    from skipkernels.models import open_clip_module
    from skipkernels.skip.towers import ModelPlan
    from skipkernels.skip.tuner import SkipConfig, exact_savings
    from skipkernels.models import HF_PREFIX, RANDOM_WEIGHTS, create_hf_model
    if name.startswith(HF_PREFIX):
        model, _ = create_hf_model(name.removeprefix(HF_PREFIX), RANDOM_WEIGHTS)
    else:
        open_clip = open_clip_module()
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        model = open_clip.create_model(name, pretrained=None)
    image, text = model_towers(model)
    out = {"image tower": f"{image.kind}, {len(image.blocks)} blocks ({type(image.blocks[0]).__name__})",
           "text tower": f"{text.kind}, {len(text.blocks)} blocks, {text.mask_kind} mask, {text.pool_type!r} pooling"}
    plan = ModelPlan(model)
    out.update(exact_savings(plan, SkipConfig()))
    out["plan"] = plan.describe().splitlines()
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: the run's when --checkpoint is a finetune "
                                                 "folder or its model.pt, else ViT-B-16)")
    p.add_argument("--checkpoint", default=None, help="tuned model: a finetune --out folder or its model.pt (PET "
                                                      "and CoOp parts included) (default: none, the --pretrained "
                                                      "model, zero-shot)")
    p.add_argument("--pretrained", default=None, help="without --checkpoint: open_clip weight name or local path "
                                                      "(zero-shot); none: random weights (default: the shipped ones "
                                                      "for skipkernels-tiny-shapes, a hf: model's own, else random)")
    p.add_argument("--template", default=None, help="prompt template (default: the run's, else 'a photo of a {}.')")
    _add_tokenizer_arg(p)
    p.add_argument("--device", default=None, help=DEVICE_HELP)


def _add_finetune_command(add_command) -> None:
    p = add_command("finetune", help="fine-tune on a CoOp-layout dataset and evaluate base/new accuracy")
    p.add_argument("--data", default=None, help="dataset root, a folder in CoOp's layout, a split_zhou_*.json, or "
                                                "an image folder DIR/<class>/<images> (default: the embedded "
                                                "synthetic set)")
    p.add_argument("--dataset", default=None, help="standard dataset name under --data (default: none, --data "
                                                   "itself is the dataset)")
    p.add_argument("--model", default="ViT-B-16", help=MODEL_HELP)
    p.add_argument("--pretrained", default=None, help="local checkpoint path or open_clip weight name; none: random "
                                                   "weights (default: the shipped ones for skipkernels-tiny-shapes, "
                                                   "a hf: model's own, else random)")
    _add_tokenizer_arg(p)
    p.add_argument("--out", default="runs/finetune", help="the run's folder: checkpoint.pt, results.json, model.pt, "
                                                          "metrics.csv, training.png; a rerun with the same settings "
                                                          "resumes it")
    p.add_argument("--all-classes", action="store_true", help="train and test on all classes (no base/new split)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over: what a run wrote in --out (checkpoint, results, model, metrics, charts, "
                        "tensorboard/) is removed first")
    p.add_argument("--zero-shot", action="store_true",
                   help="also evaluate the model before training; results.json then shows the gain")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    _add_train_args(p)
    p.set_defaults(func=cmd_finetune)


def _add_eval_command(add_command) -> None:
    p = add_command("eval", help="accuracy of a tuned or pretrained (zero-shot) model on a dataset's test split")
    p.add_argument("--data", required=True, help="dataset root, split_zhou_*.json file or image folder")
    p.add_argument("--dataset", default=None, help="standard dataset name under --data (default: none, --data "
                                                   "itself is the dataset)")
    _add_model_args(p)
    p.add_argument("--classes", default=None, choices=["base2new", "base", "new", "all"],
                   help="the classes evaluated (default: all for a --checkpoint run trained on all classes, else "
                        "base2new)")
    p.add_argument("--shots", type=int, default=None, help="image folders: the split's shots (as in finetune; "
                                                           "default: the --checkpoint run's, else 16)")
    p.add_argument("--seed", type=int, default=None, help="image folders: the split's seed (as in finetune; "
                                                          "default: the --checkpoint run's, else 1)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_eval)


def _add_predict_command(add_command) -> None:
    p = add_command("predict", help="top-k classes of images with a tuned or pretrained model")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--classes", default=None, help="a text file with one class per line, or a comma-separated list "
                                                   "(default: the classes of the --checkpoint finetune folder)")
    _add_model_args(p)
    p.add_argument("--top-k", type=int, default=5, help="classes listed per image, most probable first")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=0, help="data loader workers (0: images are read in this process)")
    p.add_argument("--out", action="append", default=[], help="write the predictions to a .csv or .json file "
                                                              "(repeat for both; default: none, printed only)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_predict)


def _add_export_command(add_command) -> None:
    p = add_command("export", help="a finetune run for use without skipkernels: an open_clip local-dir: folder, "
                                   "save_pretrained (hf: runs), or an image classifier (torch.export and ONNX)")
    from skipkernels.export import add_arguments as add_export_arguments
    from skipkernels.export import command as cmd_export
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)


def _add_demo_command(add_command) -> None:
    p = add_command("demo", help="zero-shot, FT, CoOp and Skip Tuning, base-to-new, on the embedded shapes "
                                    "set with a small pretrained CLIP")
    p.add_argument("--modes", default=DEMO_MODES, help="comma-separated modes trained, each from the same weights "
                                                       "(any finetune --mode)")
    p.add_argument("--epochs", type=positive_int, default=DEMO["epochs"], help="training epochs of each mode")
    p.add_argument("--seed", type=int, default=1, help="seed of the few-shot sample, batches, augmentation and CSkip")
    p.add_argument("--out", default="runs/demo", help="the comparison (demo.json, demo.png) and each mode's run "
                                                      "folder, OUT/<mode>, started over at every demo")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=cmd_demo)


def _add_bench_command(add_command) -> None:
    p = add_command("bench", help="step and epoch time, peak memory: FT, CoOp, Skip (reference, "
                                     "torch.compile, our kernels, CUDA graph) side by side")
    from skipkernels.bench import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def _add_reproduce_command(add_command) -> None:
    p = add_command("reproduce", help="the paper's evaluation (base-to-new, few-shot, cross-dataset, domain "
                                         "generalization) as one resumable sweep, with the paper's tables")
    from skipkernels.reproduce.command import add_arguments as add_reproduce_arguments
    add_reproduce_arguments(p)
    p.set_defaults(func=cmd_reproduce)


def _add_build_command(add_command) -> None:
    p = add_command("build", help="compile the C++/CUDA ops now for this torch, into the cache the ops load from "
                                     "(a Docker image, a cluster's shared cache)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $SKIPKERNELS_CACHE, else $XDG_CACHE_HOME/skipkernels or "
                        "~/.cache/skipkernels)")
    p.set_defaults(func=cmd_build)


def _add_info_command(add_command) -> None:
    p = add_command("info", help="torch, CUDA, Triton and where the compiled ops come from (or why not)")
    p.add_argument("--json", action="store_true", help="also print all of it as JSON")
    p.add_argument("--model", default=None, help="also show this model's towers and which exact savings apply to "
                                                 f"it, with random weights: {MODEL_HELP} (default: none)")
    p.set_defaults(func=cmd_info)


def _add_plan_command(add_command) -> None:
    p = add_command("plan", help="a run's peak training memory by kind, predicted without a GPU, and whether it fits "
                                 "a card (--gpu-memory 24GB)")
    from skipkernels.memory_plan import add_arguments as add_plan_arguments
    from skipkernels.memory_plan import command as cmd_plan
    add_plan_arguments(p)
    p.set_defaults(func=cmd_plan)


# The commands, in the order --help lists them: each adds its parser with ``add_command``.
COMMANDS = (_add_finetune_command, _add_eval_command, _add_predict_command, _add_export_command, _add_demo_command,
            _add_bench_command, _add_reproduce_command, _add_build_command, _add_info_command, _add_plan_command)


def build_parser() -> argparse.ArgumentParser:
    from skipkernels.options import HelpFormatter
    parser = argparse.ArgumentParser(prog="skipkernels", description="Skip Tuning of open_clip CLIP models")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version of skipkernels and exit")
    sub = parser.add_subparsers(dest="command", required=True, help="skipkernels COMMAND --help lists its flags")

    def add_command(name, **kwargs):  # every command's --help shows each default
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    for add in COMMANDS:
        add(add_command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from skipkernels.data.coop import DatasetError
    from skipkernels.data.images import ImageReadError
    from skipkernels.train.checkpoint import CheckpointError
    from skipkernels.train.trainer import TrainingError
    try:
        return args.func(args)
    except (DatasetError, ImageReadError, CheckpointError, TrainingError, FileNotFoundError, ValueError,
            TypeError) as err:
        print(f"skipkernels {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"skipkernels {args.command}: interrupted{INTERRUPTED.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
