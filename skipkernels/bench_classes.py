"""``skipkernels bench --classes 100,1000,10000,21841``: training cost against the class count C.

For each C and each mode (skip, ft, coop, lora, lskip-lora by default), on the same model and the
same batch: the set-up (tokenising every prompt, the text prefix cache, CSkip's zero-shot
prototypes), the step time, the classes a step runs through the text tower (K′: CSkip's subset,
else C), peak training memory (a subprocess per mode and C, as ``skipkernels bench``), and the text
prefix cache's size, dtype and device. Skip Tuning's claim is that its step follows K′, not C:
the report gives, from the smallest C to each larger one, the step's growth over K′'s growth, and
over the growth of K′ × T, the prompts times the tokens per prompt the text suffix runs (T, the
longest selected prompt; the synthetic class names, ``data.names.class_names``, give every prompt the
same length, so T is the same at every C).
Written as ``classes-<tag>.json`` with a log-log chart ``classes-<tag>.png`` beside it.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

import torch

IMAGENET_21K = 21841  # ImageNet-21k's class count: the largest point of the report


def _cache_record(tuner) -> dict | None:
    cache = getattr(tuner, "text_cache", None)
    if cache is None:
        return None
    t = cache.tokens_at_block
    return {"mb": t.numel() * t.element_size() / 2**20, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix(
        "torch."), "device": str(t.device)}


def measure_point(mode: str, base, tokenizer, scenario, device, autocast_dtype, repeats: int, warmup: int) -> dict:
    """One mode at the scenario's class count: set-up time, step times, K′ and the prefix cache."""
    from skipkernels.bench import ModeRunner, _images, _labels, _summary, _timer
    start = time.perf_counter()
    runner = ModeRunner(mode, base, tokenizer, scenario, device, autocast_dtype)
    setup_s = time.perf_counter() - start
    images = _images(scenario, runner.tuner.model, scenario.batch, device, 0)
    labels = _labels(scenario, scenario.batch, 0, scenario.shots >= 4).to(device)
    inputs = runner.inputs_for(images)
    measure = _timer(device)
    for _ in range(warmup):
        runner.step(inputs, labels)
    times = [measure(lambda: runner.step(inputs, labels)) for _ in range(repeats)]
    skipper = getattr(runner.tuner, "skipper", None)
    selected = runner.tuner.last_selected.cpu()
    cache = getattr(runner.tuner, "text_cache", None)
    # tokens per prompt the text suffix runs: the longest selected prompt (truncation), else all run
    length = cache.length_for(selected) if cache is not None and cache.truncate else \
        getattr(runner.tuner, "step_length", None)
    record = {"setup_s": setup_s, "step_s": _summary(times), "k_prime": int(selected.numel()),
              "text_length": None if length is None else int(length),
              "top_k": None if skipper is None else skipper.top_k, "text_prefix_cache": _cache_record(runner.tuner)}
    del runner
    gc.collect()
    return record


def growth(points: dict, mode: str) -> dict:
    """From the smallest C to each larger one: how the step and K′ grew, and the step's growth
    over K′'s (1.0: the step follows K′ exactly)."""
    measured = sorted((c, r[mode]) for c, r in points.items() if "step_s" in r.get(mode, {}))
    if len(measured) < 2:
        return {}
    c0, first = measured[0]
    out = {}
    for c, r in measured[1:]:
        step = r["step_s"]["median"] / first["step_s"]["median"]
        k = r["k_prime"] / first["k_prime"]
        out[str(c)] = {"from_classes": c0, "classes": c / c0, "step": step, "k_prime": k, "step_over_k_prime": step / k}
        if r.get("text_length") and first.get("text_length"):  # K′ prompts of T tokens: what the suffix runs
            tokens = k * r["text_length"] / first["text_length"]
            out[str(c)].update(text_tokens=tokens, step_over_text_tokens=step / tokens)
    return out


def format_table(points: dict, modes) -> str:
    header = f"{'C':>7} {'mode':<11} {'K′':>6} {'step ms':>10} {'set-up s':>9} {'peak MB':>9} {'text cache MB':>14}"
    lines = [header, "-" * len(header)]
    for c, results in points.items():
        for mode in modes:
            r = results.get(mode, {})
            if "step_s" not in r:
                lines.append(f"{c:>7} {mode:<11} {r.get('skipped') or r.get('error') or 'not measured'}")
                continue
            peak = (r.get("memory") or {}).get("peak_mb")
            cache = r["text_prefix_cache"]["mb"] if r["text_prefix_cache"] else 0.0
            lines.append(f"{c:>7} {mode:<11} {r['k_prime']:>6} {r['step_s']['median'] * 1e3:10.2f} "
                         f"{r['setup_s']:9.2f} {(peak if peak is not None else float('nan')):9.1f} {cache:14.1f}")
    return "\n".join(lines)


def chart(points: dict, modes, path: Path, title: str) -> bool:
    """Log-log panels against C: median step time, peak memory (when measured), and K′."""
    from skipkernels.plots import _new_figure, _save
    counts = sorted(points)
    panels = [("median step time (ms)", lambda r: r["step_s"]["median"] * 1e3)]
    if any((points[c].get(m) or {}).get("memory", {}).get("peak_mb") for c in counts for m in modes):
        panels.append(("peak training memory (MB)", lambda r: (r.get("memory") or {}).get("peak_mb")))
    panels.append(("classes per step through the text tower (K′)", lambda r: r["k_prime"]))
    figure = _new_figure(path, figsize=(4.4 * len(panels), 4.0), layout="constrained")
    if figure is None:
        return False
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, value) in zip(axes, panels):
        for index, mode in enumerate(modes):
            xy = [(c, value(points[c][mode])) for c in counts if "step_s" in points[c].get(mode, {})]
            xy = [(x, y) for x, y in xy if y]
            if xy:
                ax.plot(*zip(*xy), "o-", color=f"C{index % 10}", label=mode)
        ax.set(title=label, xlabel="classes C", xscale="log", yscale="log")
        ax.grid(True, which="both", lw=0.3)
    axes[-1].plot(counts, counts, ls="--", color="grey", lw=1, label="K′ = C")
    axes[0].legend(fontsize="small")
    axes[-1].legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    _save(figure, path)
    return True


def run(args) -> dict:
    """The class-scaling report of ``skipkernels bench --classes C1,C2,...`` (``args`` are bench's)."""
    from skipkernels.bench import (BENCH_MODES, CLASS_SCALING_MODES, Scenario, base_model, bench_mode,
                                   measure_memory)
    from skipkernels.bench_report import environment, report_path
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scenario = Scenario.default(device.type, args.quick, args.batch)
    for field in ("model", "skip_layers", "tokenizer"):
        if getattr(args, field) is not None:
            setattr(scenario, field, getattr(args, field))
    counts = sorted(args.classes)
    # bench's own default lists its step variants: not these
    modes = [m for m in args.modes.split(",") if m] if args.modes is not None else list(CLASS_SCALING_MODES)
    for mode in modes:
        if mode in BENCH_MODES and mode not in ("ft", "coop"):
            raise ValueError(f"--classes with several counts compares tuner modes "
                             f"({', '.join(CLASS_SCALING_MODES)}, or any finetune --mode); {mode!r} is one of the "
                             "bench's step variants")
        bench_mode(mode)  # an unknown mode is refused before any work
    started = time.perf_counter()
    base, tokenizer, autocast_dtype = base_model(scenario, device)
    model_s = time.perf_counter() - started
    if scenario.skip_layers is None:
        from skipkernels.skip.towers import ModelPlan
        scenario.skip_layers = ModelPlan(base).default_skip_layers()[0]
    print(f"bench --classes on {device}: {scenario.model}, batch {scenario.batch}, C = "
          f"{', '.join(map(str, counts))}, modes {', '.join(modes)}", flush=True)
    points: dict[int, dict] = {}
    for count in counts:
        point_scenario = dataclasses.replace(scenario, classes=count)
        from skipkernels.data.names import class_names
        prompts = [f"a photo of a {name}." for name in class_names(count)]
        start = time.perf_counter()
        tokenizer(prompts)
        results = {"tokenize_s": time.perf_counter() - start}
        for mode in modes:
            try:
                results[mode] = measure_point(mode, base, tokenizer, point_scenario, device, autocast_dtype,
                                              args.repeats, args.warmup)
            except (RuntimeError, ValueError) as err:  # e.g. out of memory at this C: the other points stand
                results[mode] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            print(f"  C={count} {mode}: " + (f"{results[mode]['step_s']['median'] * 1e3:.2f} ms a step, K′ "
                                              f"{results[mode]['k_prime']}" if "step_s" in results[mode]
                                              else results[mode]["error"]), flush=True)
        if not args.no_memory:
            measured = [m for m in modes if "step_s" in results[m]]
            for mode, memory in measure_memory(point_scenario, measured, device).items():
                results[mode]["memory"] = memory
        points[count] = results
    table = format_table(points, modes)
    print(table)
    report = {"scenario": dataclasses.asdict(scenario), "class_counts": counts, "modes": modes,
              "environment": environment(device), "repeats": args.repeats, "warmup": args.warmup,
              "model_setup_s": model_s, "points": {str(c): r for c, r in points.items()},
              "growth": {m: growth(points, m) for m in modes}, "table": table,
              "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter"}
    path = report_path(args.out, "classes", device, scenario.model, f"b{scenario.batch}")
    path.write_text(json.dumps(report, indent=2))
    drawn = chart(points, modes, path.with_suffix(".png"),
                  f"{report['environment']['device']}: {scenario.model}, batch {scenario.batch}")
    print(f"saved: {path}" + (" and .png" if drawn else ""))
    return report
