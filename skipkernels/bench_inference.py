"""``skipkernels bench --inference``: image -> class logits latency per tuning method, side by side.

Every method is a classifier with its class embeddings computed once and cached
(``export.ImageClassifier``), so what is timed is the image tower and one matrix product:

  zero-shot, skip, ft  a plain CLIP: Skip Tuning and full fine-tuning change weights, not the graph
  coop                 a plain CLIP too: the learned prompts' text features are cached like any class's
  vlpet-large, adapter extra modules in the towers, which run at every image
  lora                 LoRA unmerged: the low-rank path beside each adapted projection
  lora-merged          LoRA folded into the weights (PetHandle.merge): a plain CLIP again

Each runs eager and under ``torch.compile`` (``--no-compile``: eager only) at batch 1 and 64
(``--batch N``: 1 and N), and
the exported classifier of the skip method under onnxruntime where it is installed. The paper's
claim (Skip Tuning's inference 29 % below prompt-tuning and adapter methods) is the chart's
reference line: the latency those methods would have, zero-shot's / (1 - 0.29).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

INFERENCE_METHODS = ("zero-shot", "skip", "ft", "coop", "vlpet-large", "adapter", "lora", "lora-merged")
INFERENCE_BATCHES = (1, 64)
PAPER_SKIP_BELOW_PET = 0.29  # the paper: Skip Tuning's inference latency 29 % below prompt and adapter methods
# The tuner mode whose model each method runs (zero-shot, skip and ft: the same plain CLIP).
_TUNER_MODE = {"zero-shot": "ft", "skip": "skip", "ft": "ft", "coop": "coop", "vlpet-large": "vlpet-large",
               "adapter": "adapter", "lora": "lora", "lora-merged": "lora"}


def method_classifier(method: str, base, tokenizer, classnames, skip_layers):
    """The classifier of ``method`` on a copy of ``base``: class embeddings cached, eval mode."""
    from skipkernels.export import ImageClassifier, TunerImageTower
    from skipkernels.skip.tuner import SkipConfig, SkipTuner
    config = SkipConfig(mode=_TUNER_MODE[method], skip_layers=skip_layers)
    tuner = SkipTuner(copy.deepcopy(base), classnames, tokenizer, config)
    if method == "lora-merged":
        tuner.pet.merge()
    tuner.eval()
    with torch.no_grad():
        text = tuner.encode_classes(list(classnames), normalize=True).float()
    return ImageClassifier(TunerImageTower(tuner), text, tuner.model.logit_scale).eval(), tuner


def _interleaved(functions: dict, repeats: int, warmup: int, device) -> dict:
    """Times of each of ``functions`` ({name: fn}), one call of each per repetition, so that a change
    of the machine's load falls on every one alike."""
    from skipkernels.bench import _summary, _timer
    measure = _timer(device)
    times = {name: [] for name in functions}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in functions.values():
                fn()
        for _ in range(repeats):
            for name, fn in functions.items():
                times[name].append(measure(fn))
    return {name: _summary(values) for name, values in times.items()}


def _onnx_time(module, images_by_batch, repeats: int, warmup: int) -> dict | str:
    """The exported classifier's latency under onnxruntime (CPU, PyTorch's thread count), or why it
    was not measured."""
    import importlib.util
    missing = [n for n in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(n) is None]
    if missing:
        return f"not measured: {', '.join(missing)} not installed (pip install 'skipkernels[export]')"
    import onnxruntime

    from skipkernels.bench import _summary
    from skipkernels.export import write_onnx
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "classifier.onnx"
        write_onnx(module.cpu(), images_by_batch[min(images_by_batch)].cpu(), path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads PyTorch's timings had
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for size, images in images_by_batch.items():
            feed = {"images": images.cpu().numpy()}
            for _ in range(warmup):
                session.run(["logits"], feed)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(["logits"], feed)
                times.append(time.perf_counter() - start)
            out[str(size)] = _summary(times)
    return out


def measure(scenario, methods, device, repeats: int, warmup: int, compiled: bool, onnx: bool,
            batches=INFERENCE_BATCHES) -> dict:
    from skipkernels.bench import _images, base_model
    from skipkernels.data.names import class_names
    base, tokenizer, _ = base_model(scenario, device)
    if scenario.skip_layers is None:
        from skipkernels.skip.towers import ModelPlan
        scenario.skip_layers = ModelPlan(base).default_skip_layers()[0]
    classnames = class_names(scenario.classes)
    images = {b: _images(scenario, base, b, device, b) for b in batches}
    results, functions = {}, {}
    # Every method's classifier shares one forward: past dynamo's limit of compilations per code
    # object (8) the later methods would run eager, silently, under the "compiled" label.
    limit = max(8, 2 * len(methods) * len(batches))
    for method in methods:
        module, tuner = method_classifier(method, base, tokenizer, classnames, scenario.skip_layers)
        results[method] = {"parameters": sum(p.numel() for p in tuner.model.parameters())}
        for b, x in images.items():
            functions[method, "eager", str(b)] = lambda module=module, x=x: module(x)
        if compiled:
            start = time.perf_counter()
            fast = torch.compile(module, dynamic=False)
            with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
                for x in images.values():
                    fast(x)  # the compilation of each batch size, timed apart from the calls
            results[method]["compile_s"] = time.perf_counter() - start
            for b, x in images.items():
                functions[method, "compiled", str(b)] = lambda fast=fast, x=x: fast(x)
        if onnx and method == "skip":
            results[method]["onnxruntime"] = _onnx_time(copy.deepcopy(module), images, repeats, warmup)
    with torch._dynamo.config.patch(recompile_limit=limit):
        timed = _interleaved(functions, repeats, warmup, device)
    for (method, kind, b), summary in timed.items():
        results[method].setdefault(kind, {})[b] = summary
    return results


def format_table(results: dict, batches=INFERENCE_BATCHES, reference: str = "zero-shot") -> str:
    kinds = [k for k in ("eager", "compiled") if any(k in r for r in results.values())]
    columns = [(k, str(b)) for k in kinds for b in batches]
    header = f"{'method':<13}" + "".join(f" {k + ' b' + b + ' ms':>18}" for k, b in columns) + \
             f" {'vs ' + reference + ' (eager b1)':>24}"
    lines = [header, "-" * len(header)]
    ref = results.get(reference, {}).get("eager", {}).get("1", {}).get("median")
    for method, r in results.items():
        cells = "".join(f" {r[k][b]['median'] * 1e3:18.3f}" if k in r else f" {'-':>18}" for k, b in columns)
        ratio = f"{r['eager']['1']['median'] / ref:.2f}x" if ref else "-"
        lines.append(f"{method:<13}{cells} {ratio:>24}")
        if isinstance(r.get("onnxruntime"), dict):
            onnx = "".join(f" {r['onnxruntime'][b]['median'] * 1e3:18.3f}" if k == "eager" else f" {'':>18}"
                           for k, b in columns)
            lines.append(f"{'  onnxruntime':<13}{onnx}")
        elif "onnxruntime" in r:
            lines.append(f"  onnxruntime {r['onnxruntime']}")
    return "\n".join(lines)


def chart(results: dict, path: Path, title: str, batches=INFERENCE_BATCHES) -> bool:
    """Median latency per method, one panel per batch size and kind, with the paper's line."""
    from skipkernels.plots import bar_chart
    panels = []
    for kind in ("eager", "compiled"):
        for b in batches:
            values = {m: r[kind][str(b)]["median"] * 1e3 for m, r in results.items() if kind in r}
            if values:
                panels.append((f"{kind}, batch {b} (ms)", values))
    zero_shot = results.get("zero-shot", {}).get("eager", {}).get("1", {}).get("median")
    line = None if zero_shot is None else (0, zero_shot * 1e3 / (1 - PAPER_SKIP_BELOW_PET))
    return bar_chart(panels, path, title + f"\ndashed: the PET methods' latency the paper implies (zero-shot / "
                                           f"{1 - PAPER_SKIP_BELOW_PET:.2f})", reference_line=line)


def run(args) -> dict:
    """``skipkernels bench --inference`` (``args`` are bench's)."""
    from skipkernels.bench import Scenario
    from skipkernels.bench_report import environment, report_path
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scenario = Scenario.default(device.type, args.quick, args.batch)
    for field in ("model", "skip_layers", "tokenizer"):
        if getattr(args, field) is not None:
            setattr(scenario, field, getattr(args, field))
    if args.classes:
        scenario.classes = args.classes[0]
    # bench's default lists training modes, not these
    methods = [m for m in args.modes.split(",") if m] if args.modes is not None else list(INFERENCE_METHODS)
    unknown = [m for m in methods if m not in INFERENCE_METHODS]
    if unknown:
        raise ValueError(f"--inference measures the methods {', '.join(INFERENCE_METHODS)}; unknown: {unknown}")
    batches = (1, args.batch) if args.batch and args.batch > 1 else INFERENCE_BATCHES  # --batch: the large one
    print(f"bench --inference on {device}: {scenario.model}, C={scenario.classes}, batches "
          f"{', '.join(map(str, batches))}, methods {', '.join(methods)}", flush=True)
    results = measure(scenario, methods, device, args.repeats, args.warmup, not args.no_compile,
                      onnx=device.type == "cpu", batches=batches)
    table = format_table(results, batches)
    print(table)
    report = {"scenario": dataclasses.asdict(scenario), "methods": methods, "batches": list(batches),
              "environment": environment(device), "repeats": args.repeats, "warmup": args.warmup,
              "paper_reference": {"skip_below_pet": PAPER_SKIP_BELOW_PET}, "results": results, "table": table,
              "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter"}
    path = report_path(args.out, "inference", device, scenario.model, f"c{scenario.classes}")
    path.write_text(json.dumps(report, indent=2))
    drawn = chart(results, path.with_suffix(".png"), f"{report['environment']['device']}: {scenario.model}, "
                                                     f"C={scenario.classes}, image -> logits", batches)
    print(f"saved: {path}" + (" and .png" if drawn else ""))
    return report
