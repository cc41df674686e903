"""The report of a ``skipkernels bench`` run: the modes side by side as a table (ratios against the
paper-style step), a bar chart, and the JSON with the machine, versions, commit and date."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import subprocess
from pathlib import Path

import torch


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    from skipkernels._version import versions
    env = versions()
    env.update({"device": torch.cuda.get_device_name(0) if device.type == "cuda" else
                (os.uname().machine + " cpu, " + str(os.cpu_count()) + " cores"),
                "git_commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    return env


def format_table(results: dict, reference: str | None = None) -> str:
    """The modes side by side; ratios against ``paper`` when it ran, else ``skip-ref``."""
    if reference is None:
        reference = "paper" if "step_s" in results.get("paper", {}) else "skip-ref"
    ref = results.get(reference, {}).get("step_s", {}).get("median")
    header = f"{'mode':<18} {'step ms (median)':>17} {'min-max ms':>17} {'vs ' + reference:>13} " \
             f"{'epoch s':>9} {'cache s':>8} {'peak MB':>9} {'cache MB':>9}"
    lines = [header, "-" * len(header)]
    for mode, r in results.items():
        step = r.get("step_s")
        if step is None:
            lines.append(f"{mode:<18} {r.get('skipped', '')}")
            continue
        ratio = f"{ref / step['median']:.2f}x" if ref else "-"
        mem = r.get("memory", {}).get("peak_mb")
        lines.append(f"{mode:<18} {step['median'] * 1e3:17.2f} {step['min'] * 1e3:8.2f}-{step['max'] * 1e3:<8.2f} "
                     f"{ratio:>13} {r.get('epoch_s', float('nan')):9.2f} {r.get('epoch_cache_s', 0.0):8.2f} "
                     f"{(mem if mem is not None else float('nan')):9.1f} {r.get('cache_mb', 0.0):9.1f}")
    return "\n".join(lines)


def chart(results: dict, path: Path, title: str) -> bool:
    """Median step time and (when measured) peak memory of every measured mode, as bar panels."""
    from skipkernels.plots import bar_chart
    modes = [m for m, r in results.items() if "step_s" in r]
    panels = [("median step time (ms)", {m: results[m]["step_s"]["median"] * 1e3 for m in modes})]
    if any("memory" in results[m] for m in modes):  # --no-memory: no panel of zeros
        panels.append(("peak training memory (MB)",
                       {m: results[m].get("memory", {}).get("peak_mb") or 0.0 for m in modes}))
    return bar_chart(panels, path, title)


def format_finetune(finetune: dict) -> str:
    """finetune's steady step per kind beside the bench's time for the same step object."""
    lines = []
    for kind, r in finetune.items():
        beside = f"bench {r['bench_mode']} {r['bench_step_ms']:.2f} ms: {r['vs_bench']:.2f}x" \
            if r["bench_step_ms"] is not None else f"bench {r['bench_mode']} not measured in this run"
        lines.append(f"finetune --step {kind:<8} {r['steady_step_ms']:8.2f} ms a step ({beside}); "
                     f"step: {r['step']}")
    return "\n".join(lines)


def report_path(out, kind: str, device, model: str, label: str) -> Path:
    """``out/<kind>-<device>-<model>-<label>-<UTC stamp>.json`` (the folder made): where a bench
    report goes; its chart takes the same name with ``.png``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")  # hf:<folder> names a path
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{kind}-{device.type}-{model}-{label}-{stamp}.json"


def write(results: dict, scenario, device, repeats: int, warmup: int, out: Path, finetune: dict | None = None) -> dict:
    """Print the table; write ``e2e-<tag>.json`` and ``.png`` under ``out``; return the report."""
    table = format_table(results)
    if finetune:
        table += "\n\n" + format_finetune(finetune)
    print(table)
    report = {"scenario": dataclasses.asdict(scenario), "environment": environment(device),
              "repeats": repeats, "warmup": warmup, "results": results, "table": table,
              "timing": "CUDA events" if device.type == "cuda" else "time.perf_counter"}
    if finetune:
        report["finetune"] = finetune
    path = report_path(out, "e2e", device, scenario.model, f"b{scenario.batch}")
    path.write_text(json.dumps(report, indent=2))
    drawn = chart(results, path.with_suffix(".png"), f"{report['environment']['device']}: {scenario.model}, "
                                                     f"C={scenario.classes}, batch {scenario.batch}")
    print(f"saved: {path}" + (" and .png" if drawn else ""))
    return report
