"""``skipkernels reproduce``: the paper's four benchmarks as one resumable, shardable sweep."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from skipkernels.reproduce import protocols
from skipkernels.reproduce.protocols import DEFAULT_MODES, DEFAULT_SEEDS, PROTOCOLS, ZERO_SHOT, parse_list

# Flags of finetune's configs the sweep sets per run (--shots/--seeds/--modes are lists here).
EXCLUDED = {"SkipConfig": ("mode",), "TrainConfig": ("shots", "seed")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from skipkernels.ops.policy import KernelPolicy
    from skipkernels.options import add_options
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.trainer import TrainConfig
    p.add_argument("--protocol", default=None,
                   help=f"one or more of {', '.join(PROTOCOLS)}, comma-separated (base2new: base-to-new "
                        "generalization; fewshot; cross: cross-dataset from ImageNet; dg: domain generalization)")
    p.add_argument("--data", default=None, help="the datasets' root: each dataset in its CoOp folder under it "
                                                "(--dry-run lists the folders)")
    p.add_argument("--datasets", default=None, help="comma-separated subset of the protocol's datasets (for cross "
                                                    "and dg: the targets); default: all of them")
    p.add_argument("--seeds", default=None, help=f"comma-separated seeds (default: {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--shots", default=None, help="comma-separated shots per class (default: the protocol's: 16; "
                                                 "fewshot 1,2,4,8,16)")
    p.add_argument("--modes", default=None, help=f"comma-separated methods (default: {','.join(DEFAULT_MODES)}); any "
                                                 "finetune --mode, and zero-shot")
    p.add_argument("--source", default=None, help="cross and dg: the dataset trained on (default: imagenet)")
    p.add_argument("--out", default="runs/reproduce", help="the sweep's folder: one folder per run, the tables")
    p.add_argument("--shard", default=None, metavar="K/N", help="run every N-th run starting at K (0-based), so N "
                                                                 "processes share one --out")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, epochs, steps, missing datasets) "
                                                          "and stop")
    p.add_argument("--tables-only", action="store_true", help="rebuild the tables from the finished runs in --out")
    p.add_argument("--compare-paper", action="store_true", help="add the paper's published rows to the tables")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (or skipkernels-tiny)")
    p.add_argument("--pretrained", default=None, help="local checkpoint path or open_clip weight name; none: random "
                                                      "(default: the shipped ones for skipkernels-tiny-shapes)")
    p.add_argument("--tokenizer", default=None, help="as finetune's --tokenizer")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda where available, else cpu)")
    add_options(p, SkipConfig, exclude=EXCLUDED["SkipConfig"])
    add_options(p, TrainConfig, exclude=EXCLUDED["TrainConfig"])
    add_options(p, KernelPolicy)


def _modes(text):
    from skipkernels.skip.tuner import MODES
    modes = parse_list(text, "modes", default=DEFAULT_MODES)
    bad = [m for m in modes if m != ZERO_SHOT and m not in MODES]
    if bad:
        raise ValueError(f"--modes: {bad[0]!r} is not a method; choose from {', '.join(MODES)}, {ZERO_SHOT}")
    return modes


def _user_set(args, cls, fields) -> set:
    """The protocol fields the user set on the command line (they differ from the default): those
    win over the protocol's setting."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {name for name in fields if hasattr(args, name) and getattr(args, name) != defaults.get(name)}


def build_sweep(args):
    """(Sweep, runs, shard) from the parsed flags, every flag checked before anything runs."""
    from skipkernels.flags import check_training_flags, flag_device, kernel_policy
    from skipkernels.models import resolve_pretrained
    from skipkernels.options import from_args
    from skipkernels.reproduce.sweep import Sweep
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.trainer import TrainConfig
    if not args.protocol:
        raise ValueError(f"--protocol is required: one or more of {', '.join(PROTOCOLS)}")
    if not args.data:
        raise ValueError("--data is required: the folder holding the datasets (see --dry-run for the layout)")
    names = parse_list(args.protocol, "protocol")
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise ValueError(f"--protocol must be among {', '.join(PROTOCOLS)}, got {unknown[0]!r}")
    seeds = parse_list(args.seeds, "seeds", int, DEFAULT_SEEDS)
    shots = parse_list(args.shots, "shots", int) or None
    modes = _modes(args.modes)
    datasets = parse_list(args.datasets, "datasets") or None
    shard = protocols.parse_shard(args.shard)
    runs = []
    for name in names:
        chosen = datasets
        if datasets:
            allowed = set(PROTOCOLS[name].datasets) | {args.source or PROTOCOLS[name].source}
            chosen = tuple(d for d in datasets if d in allowed)
            if not chosen:
                raise ValueError(f"--datasets: none of {', '.join(datasets)} belongs to {name} "
                                 f"({', '.join(PROTOCOLS[name].datasets)})")
        runs += protocols.plan(name, chosen, seeds, shots, modes, args.source)
    skip = from_args(SkipConfig, args, exclude=EXCLUDED["SkipConfig"])
    train = from_args(TrainConfig, args, exclude=EXCLUDED["TrainConfig"])
    policy = kernel_policy(args, train)
    check_training_flags(args, train, policy)
    left_to_protocol = tuple(f for f in Sweep.protocol_fields if f not in _user_set(args, TrainConfig,
                                                                                      Sweep.protocol_fields))
    pretrained = resolve_pretrained(args.model, args.pretrained, say=False)
    sweep = Sweep(Path(args.data), Path(args.out), args.model, pretrained, args.tokenizer, skip, train,
                  policy=policy, device=flag_device(args.device), protocol_fields=left_to_protocol,
                  progress=train.progress)
    return sweep, runs, shard


def dry_run(sweep, runs, probes, shard, file=None) -> None:
    from skipkernels.reproduce.sweep import expected_steps, is_finished, shard_of
    file = file or sys.stdout
    mine = shard_of(runs, shard)
    print(f"plan: {len(mine)} runs" + (f" (shard {shard[0]}/{shard[1]} of {len(runs)})" if shard[1] > 1 else ""),
          file=file)
    total = 0
    for run in mine:
        epochs, steps = expected_steps(sweep, run, probes)
        total += steps or 0
        state = "finished" if is_finished(sweep, run) else "to run"
        targets = f" -> {', '.join(run.targets)}" if run.targets else ""
        print(f"  {run.key}{targets}: {epochs} epochs, {steps if steps is not None else '?'} steps ({state})",
              file=file)
    print(f"training steps in all: {total}", file=file)
    missing = {name: p for name, p in probes.items() if p.error}
    for name, p in probes.items():
        line = f"{p.classes} classes" if not p.error else f"MISSING: {p.error}"
        print(f"  dataset {name}: {p.folder} ({line})", file=file)
    if missing:
        print(f"{len(missing)} dataset(s) missing or malformed: their runs would be recorded as failed",
              file=file)


def run(args) -> int:
    from skipkernels.reproduce import tables
    from skipkernels.reproduce.sweep import probe, run_sweep
    if args.tables_only:
        if not Path(args.out).is_dir():
            raise FileNotFoundError(f"--out {args.out}: no sweep folder there")
        summary = tables.write(args.out, args.compare_paper)
        _print_written(args.out, summary)
        return 0
    sweep, runs, shard = build_sweep(args)
    needed = dict.fromkeys(d for r in runs for d in (r.dataset, *r.targets))
    probes = {name: probe(sweep.data_root, name) for name in needed}
    if args.dry_run:
        dry_run(sweep, runs, probes, shard)
        return 0
    outcome = run_sweep(sweep, runs, probes, shard)
    summary = tables.write(args.out, args.compare_paper)
    print(json.dumps({k: len(v) for k, v in outcome.items()}))
    _print_written(args.out, summary)
    for failure in outcome["failed"]:
        print(f"failed: {failure['run']}: {failure['error']}", file=sys.stderr)
    return 1 if outcome["failed"] else 0


def _print_written(out, summary) -> None:
    out = Path(out)
    charts = ", ".join(summary.get("charts") or []) or "none"
    print(f"tables: {out / 'table.md'}, {out / 'table.csv'}, {out / 'summary.json'}; charts: {charts}")
