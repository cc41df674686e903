"""Python overhead of one steady-state Skip Tuning step: how many calls run inside skipkernels,
and how often the step re-derives what could be decided once (the towers, a block's parts, its
hooks, the kernel policy). cProfile's call counts are deterministic, so they can be compared
between commits; the wall time of the eager step is measured too (min and median of --repeat).

    python bench/step_overhead.py [--model ViT-B-16] [--classes 100] [--batch 4] [--omega 6]
    python bench/step_overhead.py --model skipkernels-tiny --batch 1 --omega 2 --repeat 500 \
        --before /path/to/an/older/checkout --rounds 3 --out bench/results/step-overhead.json

``--before`` measures an older checkout's package with this same script and settings, each in a
process of its own (the checkout first on PYTHONPATH), alternating with this one for ``--rounds``,
and prints both side by side.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import skipkernels
from skipkernels import SkipConfig, SkipTuner
from skipkernels.models import create_model

# What a steady step must not re-derive: the towers, a block's parts, its hooks, the kernel policy,
# an op's binding, a measured-table lookup.
WATCHED = {"model_towers": "families.py", "block_parts": "ops/block.py", "block_hooks": "pet/hooks.py",
           "resolve": "ops/policy.py", "bind": "ops/op.py", "prefers_triton": "ops/measured.py"}


def build(model_name, classes, batch, omega, mode="skip"):
    model, tokenizer = create_model(model_name, pretrained="none", seed=0)
    model = skipkernels.patch_clip(model)
    names = [f"class {i}" for i in range(classes)]
    tuner = SkipTuner(model, names, tokenizer, SkipConfig(mode=mode, skip_layers=omega))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % classes
    return tuner, tuner.image_prefix(images), labels


def one_step(tuner, tokens, labels):
    tuner.zero_grad(set_to_none=True)
    tuner.loss(tokens, labels).backward()


def counts(tuner, tokens, labels) -> dict:
    profile = cProfile.Profile()
    profile.enable()
    one_step(tuner, tokens, labels)
    profile.disable()
    stats = pstats.Stats(profile).stats
    inside = sum(calls for (file, _, _), (_, calls, *_rest) in stats.items() if "/skipkernels/" in file)
    watched = {name: sum(calls for (file, _, fn), (_, calls, *_rest) in stats.items()
                         if fn == name and file.endswith(where)) for name, where in WATCHED.items()
               if (Path(skipkernels.__file__).parent / where).is_file()}
    return {"python_calls_in_skipkernels": inside, **watched}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--omega", type=int, default=6)
    p.add_argument("--mode", default="skip")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--before", default=None, help="an older checkout to measure side by side")
    p.add_argument("--rounds", type=int, default=2, help="with --before: alternating runs of each")
    p.add_argument("--out", default=None, help="with --before: write both results here as JSON")
    args = p.parse_args(argv)
    if args.before:
        return side_by_side(args)
    tuner, tokens, labels = build(args.model, args.classes, args.batch, args.omega, args.mode)
    for _ in range(2):  # steady state: caches, lazy loads and first-call work done
        one_step(tuner, tokens, labels)
    result = counts(tuner, tokens, labels)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        one_step(tuner, tokens, labels)
        times.append(time.perf_counter() - start)
    result.update(model=args.model, mode=args.mode, classes=args.classes, batch=args.batch, omega=args.omega,
                  step_ms_min=round(1e3 * min(times), 3), step_ms_median=round(1e3 * statistics.median(times), 3),
                  torch=torch.__version__, package=str(Path(skipkernels.__file__).parent))
    print(json.dumps(result, indent=1))
    return result


def _run(tree: Path, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], cwd=tree, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout[run.stdout.index("{"):])


def side_by_side(args) -> dict:
    trees = {"before": Path(args.before).resolve(), "after": Path(__file__).resolve().parent.parent}
    own = [f"--{name}={getattr(args, name)}" for name in ("model", "classes", "batch", "omega", "mode", "repeat")]
    runs = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(_run(tree, own))
    rows = {}
    for name, results in runs.items():
        rows[name] = {"python_calls_in_skipkernels": results[0]["python_calls_in_skipkernels"],
                      "step_ms_min": min(r["step_ms_min"] for r in results),
                      "step_ms_median_of_rounds": statistics.median(r["step_ms_median"] for r in results),
                      "runs": results}
    print(f"{'':8} {'calls in skipkernels':>21} {'step ms (min)':>14} {'step ms (median)':>17}")
    for name, row in rows.items():
        print(f"{name:8} {row['python_calls_in_skipkernels']:21d} {row['step_ms_min']:14.3f} "
              f"{row['step_ms_median_of_rounds']:17.3f}")
    report = {"settings": own, "package": {name: r[0]["package"] for name, r in runs.items()}, "rounds": args.rounds, "trees": {k: str(v) for k, v in trees.items()}, **rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
