"""The tables of docs/MEMORY.md, printed as markdown: ``skipkernels plan``'s predicted peak training
memory on a GPU per model, mode and batch, which cards it fits, and ViT-B/16's CPU prediction
beside the CPU allocator's measurement.

    python bench/memory_table.py              # the tables (probe steps from bench/results/memory-probes.json)
    python bench/memory_table.py --readme     # the README's summary of them
    python bench/memory_table.py --measure    # also measure ViT-B/16 on this CPU into
                                              # bench/results/memory-vitb16-cpu.json (minutes)
    python bench/memory_table.py --compare ViT-B-16,ViT-L-14 --device cuda --out FILE.json
        # the plan beside skipkernels bench's measured peak by kind (a subprocess per mode; on a
        # CPU the bench measures the part of the peak above the weights and caches)

The probe steps are kept in bench/results/memory-probes.json, so printing the tables again takes
seconds; a probe not in it (another torch, a changed key) runs and is added.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skipkernels.memory_plan import KINDS, measure_memory, plan_memory  # noqa: E402

PROBES = ROOT / "bench" / "results" / "memory-probes.json"
MEASURED = ROOT / "bench" / "results" / "memory-vitb16-cpu.json"
MODELS = ("ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14", "ViT-SO400M-14-SigLIP")
MODES = ("skip", "ft", "coop", "lora")
BATCHES = (4, 32)
CLASSES = 100
CARDS_GIB = (24, 40, 80)
SHORT = {"weights": "weights", "gradients": "gradients", "optimizer_state": "momentum",
         "caches_and_inputs": "caches, inputs", "activations_and_workspace": "activations"}


def gpu_table(modes=MODES, batches=BATCHES, step: str = "auto") -> str:
    lines = [f"| model | mode | batch | step, update | {' | '.join(SHORT[k] for k in KINDS)} | total | "
             + " | ".join(f"{gib} GiB" for gib in CARDS_GIB) + " |",
             "| --- | --- | ---: | --- | " + " | ".join("---:" for _ in KINDS) + " | ---: | "
             + " | ".join(":---:" for _ in CARDS_GIB) + " |"]
    for model in MODELS:
        for mode in modes:
            for batch in batches:
                try:
                    plan = plan_memory(model, mode=mode, batch_size=batch, num_classes=CLASSES, step=step,
                                       probe_cache=PROBES)
                except ValueError as err:  # a mode the model does not support
                    lines.append(f"| {model} | {mode} | {batch} | not run: {err} |" + " |" * (len(KINDS) + 1
                                                                                          + len(CARDS_GIB)))
                    continue
                update = "in backward" if plan.update_in_backward else "after backward"
                fits = [_fits(plan, model, mode, batch, step, gib) for gib in CARDS_GIB]
                lines.append(f"| {model} | {mode} | {batch} | {plan.step}, {update} | "
                             + " | ".join(f"{plan.kinds_mb[k] / 1024:.2f}" for k in KINDS)
                             + f" | {plan.total_mb / 1024:.1f} | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def _fits(plan, model: str, mode: str, batch: int, step: str, gib: int) -> str:
    """Whether the run fits a card of ``gib`` GiB, with the step ``auto`` takes on that card
    where the card's memory changed it (train/step.py graph_memory_unavailable)."""
    if step != "auto" or plan.step != "graph":
        return "yes" if plan.total_mb <= gib * 1024 else "no"
    card = plan_memory(model, mode=mode, batch_size=batch, num_classes=CLASSES, step=step, probe_cache=PROBES,
                       device_memory=gib * 2 ** 30, search=False)
    return ("yes" if card.fits else "no") + (f" ({card.step}, {card.total_mb / 1024:.1f})" if card.step != plan.step
                                             else "")


def _cpu_plan(mode: str, batch: int):
    return plan_memory("ViT-B-16", mode=mode, batch_size=batch, num_classes=CLASSES, device_type="cpu",
                       cache_images=0, probe_cache=PROBES)


def measure() -> None:
    out = {}
    for mode in MODES:
        for batch in BATCHES:
            print(f"measuring ViT-B-16 {mode} batch {batch}", file=sys.stderr, flush=True)
            out[f"{mode}-{batch}"] = measure_memory("ViT-B-16", mode=mode, batch_size=batch, num_classes=CLASSES)
    MEASURED.write_text(json.dumps(out, indent=1) + "\n")


def cpu_table() -> str:
    measured = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    lines = ["| mode | batch | " + " | ".join(f"{SHORT[k]} predicted / measured" for k in KINDS)
             + " | total predicted / measured |",
             "| --- | ---: | " + " | ".join("---:" for _ in KINDS) + " | ---: |"]
    for mode in MODES:
        for batch in BATCHES:
            plan = _cpu_plan(mode, batch)
            seen = measured.get(f"{mode}-{batch}")
            cells = []
            for kind in KINDS:
                value = f"{plan.kinds_mb[kind]:.0f}"
                cells.append(value + (f" / {seen[kind]:.0f}" if seen else " / n/a"))
            total = sum(seen[k] for k in KINDS) if seen else None
            lines.append(f"| {mode} | {batch} | " + " | ".join(cells) + f" | {plan.total_mb:.0f} / "
                         + (f"{total:.0f}" if total is not None else "n/a") + " |")
    return "\n".join(lines)


def readme_table() -> str:
    """The README's summary: each family's predicted peak at batch 4 per mode, and ViT-B/16's
    CPU prediction beside the allocator's measurement."""
    columns = (("skip", "eager"), ("skip", "auto"), ("ft", "auto"), ("coop", "auto"), ("lora", "auto"))
    lines = ["| model | Skip, compiled step | Skip, auto step | FT | CoOp | LoRA |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for model in MODELS:
        cells = []
        for mode, step in columns:
            try:
                plan = plan_memory(model, mode=mode, batch_size=4, num_classes=CLASSES, step=step,
                                   probe_cache=PROBES)
                cells.append(f"{plan.total_mb / 1024:.1f}")
            except ValueError:  # a mode the model does not support
                cells.append("n/a")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    measured = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    seen = measured.get("skip-4")
    plan = _cpu_plan("skip", 4)
    lines.append("")
    lines.append(f"ViT-B/16 Skip Tuning at batch 4 on this CPU (fp32): {plan.total_mb:.0f} MB predicted, "
                 + (f"{sum(seen[k] for k in KINDS):.0f} MB measured by the CPU allocator." if seen else
                    "not measured."))
    return "\n".join(lines)


COMPARE_MODES = ("skip-kernels", "skip-graph", "ft", "lora")


def compare(models, device_name: str, modes=COMPARE_MODES, batch: int = 4, classes: int = CLASSES) -> dict:
    """skipkernels bench's measured memory of each mode (its subprocess per mode), with the plan's
    prediction it now carries, for each model; printed side by side."""
    import torch

    from skipkernels.bench import Scenario, _available_modes
    from skipkernels.bench import measure_memory as bench_memory
    device = torch.device(device_name)
    report = {}
    for model in models:
        scenario = Scenario(model, classes, 16, batch, None, 0)
        runnable, skipped = _available_modes(list(modes), device)
        results = bench_memory(scenario, runnable, device)
        report[model] = {**results, **{m: {"skipped": why} for m, why in skipped.items()}}
        for mode, entry in results.items():
            predicted = entry.get("predicted_mb")
            if not predicted:
                print(f"{model} {mode}: {entry.get('error') or entry.get('predicted_note')}")
                continue
            if "breakdown_mb" in entry:  # CUDA: every kind measured
                measured = entry["breakdown_mb"]
                parts = "  ".join(f"{SHORT[k]} {predicted[k]:.0f}/{measured[k]:.0f}" for k in KINDS)
                total_p, total_m = sum(predicted.values()), entry["peak_mb"]
            else:  # CPU: the peak above the weights and caches
                parts = "  ".join(f"{SHORT[k]} {predicted[k]:.0f}" for k in KINDS)
                total_p, total_m = entry["predicted_peak_mb"], entry["peak_mb"]
            ratio = total_p / total_m if total_m else float("nan")
            print(f"{model} {mode:<13} MB predicted/measured: {parts}  peak {total_p:.0f}/{total_m:.0f} "
                  f"({ratio:.2f}x)", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="measure ViT-B/16 on this CPU first (minutes)")
    parser.add_argument("--compare", default=None, metavar="MODELS",
                        help="comma-separated models: the plan beside the bench's measured memory, then stop")
    parser.add_argument("--modes", default=",".join(COMPARE_MODES), help="bench modes of --compare")
    parser.add_argument("--device", default="cuda", help="the device --compare measures on (cpu works too)")
    parser.add_argument("--batch", type=int, default=4, help="images per step of --compare")
    parser.add_argument("--classes", type=int, default=CLASSES, help="classes of --compare")
    parser.add_argument("--out", default=None, help="--compare: also write the JSON here")
    parser.add_argument("--readme", action="store_true", help="print the README's summary table only")
    args = parser.parse_args()
    if args.readme:
        print(readme_table())
        return
    if args.compare:
        report = compare([m for m in args.compare.split(",") if m], args.device,
                         [m for m in args.modes.split(",") if m], args.batch, args.classes)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        return
    if args.measure:
        measure()
    print(f"Predicted on a GPU: bf16 autocast, {CLASSES} classes, 16 shots a class in the LSkip image cache, the "
          "Trainer's auto step (the CUDA graph wherever it can run, so the update after backward). GiB. In a "
          "card's column, where the graph's gradients and update temporaries would take more than half of what "
          "the card has left for the steps, auto takes the compiled step there instead (the update inside "
          "backward): that step and its total are in brackets.\n")
    print(gpu_table())
    print("\nSkip Tuning at batch 4 with `--step eager` (or compiled): the update inside backward, no gradient "
          "buffer. GiB.\n")
    print(gpu_table(modes=("skip",), batches=(4,), step="eager"))
    print(f"\nViT-B/16 on this CPU (fp32, eager step, update inside backward, {CLASSES} classes, one batch of "
          "inputs, no epoch cache), MB: predicted / measured by the CPU allocator (bench/results/"
          f"{MEASURED.name}).\n")
    print(cpu_table())


if __name__ == "__main__":
    main()
