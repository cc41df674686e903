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
USAGE = ("%(prog)s --protocol NAME[,NAME...] --data ROOT [--out OUT] [options]\n"
         "       %(prog)s --tables-only [--out OUT] [--compare-paper]")


def _protocols_epilog() -> str:
    lines = ["each protocol's settings (a flag given, e.g. --epochs or --lr, overrides them in every protocol):"]
    for name, p in PROTOCOLS.items():
        lines.append(f"  {name:<9} {','.join(map(str, p.shots))} shots; {protocols.describe_training(p.train)}")
    lines += [f"{protocols.QUARTER_EPOCH_NAMES} get a quarter of the epochs (at least 1). The other training flags "
              "default to finetune's.", "Where each comes from: skipkernels/reproduce/protocols.py. table.md states "
              "the settings its runs ran with."]
    return "\n".join(lines)


def _protocol_default(field: str) -> str:
    values = ", ".join(f"{name} {protocols.number(p.train[field])}" for name, p in PROTOCOLS.items())
    quarter = f"; a quarter for {protocols.QUARTER_EPOCH_NAMES}" if field == "epochs" else ""
    return f"(default: the protocol's: {values}{quarter})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from skipkernels.flags import DEVICE_HELP, MODEL_HELP
    from skipkernels.ops.policy import KernelPolicy
    from skipkernels.options import HelpFormatter, add_options, spec
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.trainer import TrainConfig

    class ReproduceHelp(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        """--help with each default, and the epilog's table of protocols as written."""

    p.usage, p.epilog, p.formatter_class = USAGE, _protocols_epilog(), ReproduceHelp
    required = p.add_argument_group("required, except with --tables-only")
    p._action_groups.insert(0, p._action_groups.pop())  # listed first in --help
    required.add_argument("--protocol", default=None,
                          help=f"one or more of {', '.join(PROTOCOLS)}, comma-separated (base2new: base-to-new "
                               "generalization; fewshot; cross: cross-dataset from ImageNet; dg: domain "
                               "generalization)")
    required.add_argument("--data", default=None, help="the datasets' root: each dataset in its CoOp folder under "
                                                       "it (--dry-run lists the folders)")
    p.add_argument("--datasets", default=None, help="comma-separated subset of the protocol's datasets (for cross "
                                                    "and dg: the targets); default: all of them")
    p.add_argument("--seeds", default=None, help=f"comma-separated seeds (default: {','.join(map(str, DEFAULT_SEEDS))})")
    p.add_argument("--shots", default=None, help="comma-separated shots per class (default: the protocol's: 16; "
                                                 "fewshot 1,2,4,8,16)")
    p.add_argument("--modes", default=None, help=f"comma-separated methods (default: {','.join(DEFAULT_MODES)}); any "
                                                 "finetune --mode, and zero-shot")
    p.add_argument("--source", default=None, help="cross and dg: the dataset trained on (default: imagenet)")
    p.add_argument("--out", default="runs/reproduce", help="the sweep's folder: one folder per run, the tables")
    p.add_argument("--no-resume", action="store_true",
                   help="train again, from the start, every run of the sweep not finished with these settings: one "
                        "whose folder holds a run made with other settings (refused without this flag), an "
                        "interrupted or a failed one. Runs finished with these settings are kept")
    p.add_argument("--shard", default=None, metavar="K/N", help="run every N-th run starting at K (0-based), so N "
                                                                 "processes share one --out (default: 0/1, every run)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, epochs, steps, what each run's "
                                                          "folder holds, missing datasets, shots a dataset cannot "
                                                          "give) and stop")
    p.add_argument("--tables-only", action="store_true", help="rebuild the tables from the finished runs in --out")
    p.add_argument("--compare-paper", action="store_true", help="add the paper's published rows to the tables")
    p.add_argument("--model", default="ViT-B-16", help=MODEL_HELP)
    p.add_argument("--pretrained", default=None, help="local checkpoint path or open_clip weight name; none: random "
                                                      "(default: the shipped ones for skipkernels-tiny-shapes)")
    p.add_argument("--tokenizer", default=None, help="as finetune's --tokenizer (default: the model's own)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    add_options(p, SkipConfig, exclude=EXCLUDED["SkipConfig"])
    add_options(p, TrainConfig, exclude=EXCLUDED["TrainConfig"] + protocols.PROTOCOL_FIELDS)
    for field in (f for f in dataclasses.fields(TrainConfig) if f.name in protocols.PROTOCOL_FIELDS):
        # default None: any value given, even finetune's default, wins over the protocol's
        p.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=type(field.default), default=None,
                       help=f"{spec(field).help} {_protocol_default(field.name)}")
    add_options(p, KernelPolicy)


def _modes(text):
    from skipkernels.skip.tuner import MODES
    modes = parse_list(text, "modes", default=DEFAULT_MODES)
    bad = [m for m in modes if m != ZERO_SHOT and m not in MODES]
    if bad:
        raise ValueError(f"--modes: {bad[0]!r} is not a method; choose from {', '.join(MODES)}, {ZERO_SHOT}")
    return modes


def build_sweep(args):
    """(Sweep, runs, shard) from the parsed flags, every flag checked before anything runs."""
    from skipkernels.flags import check_training_flags, flag_device, kernel_policy, note_top_ratio_count
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
    note_top_ratio_count(args)
    skip = from_args(SkipConfig, args, exclude=EXCLUDED["SkipConfig"])
    given = {f: getattr(args, f) for f in protocols.PROTOCOL_FIELDS if getattr(args, f, None) is not None}
    train = from_args(TrainConfig, args, exclude=EXCLUDED["TrainConfig"] + protocols.PROTOCOL_FIELDS, **given)
    policy = kernel_policy(args, train)
    check_training_flags(args, train, policy)
    left_to_protocol = tuple(f for f in protocols.PROTOCOL_FIELDS if f not in given)
    pretrained = resolve_pretrained(args.model, args.pretrained, say=False)
    sweep = Sweep(Path(args.data), Path(args.out), args.model, pretrained, args.tokenizer, skip, train,
                  policy=policy, device=flag_device(args.device), protocol_fields=left_to_protocol,
                  progress=train.progress)
    return sweep, runs, shard


def _folder_note(state: str, diffs: list, replace: bool) -> str:
    from skipkernels.reproduce import sweep as sw
    if state == sw.OTHER_SETTINGS:
        what = f"its folder holds a run made with other settings: {'; '.join(diffs)}"
        return f"{what}; --no-resume trains it again" if not replace else f"to run again from the start: {what}"
    if state == sw.UNFINISHED:
        return "to run again from the start (--no-resume)" if replace else "to run: resumes from its checkpoint"
    if state == sw.FAILED:
        return "to run again: it failed before" + (" (from the start)" if replace else "")
    return {sw.FINISHED: "finished: kept", sw.EMPTY: "to run"}[state]


def dry_run(sweep, runs, probes, shard, states, replace=False, file=None) -> None:
    """The plan: each run with its epochs, steps and what will happen to it, then each dataset."""
    from skipkernels.reproduce import sweep as sw
    file = file or sys.stdout
    mine = sw.shard_of(runs, shard)
    print(f"plan: {len(mine)} runs" + (f" (shard {shard[0]}/{shard[1]} of {len(runs)})" if shard[1] > 1 else ""),
          file=file)
    total = left = 0
    cannot = mismatched = 0
    for run in mine:
        epochs, steps = sw.expected_steps(sweep, run, probes)
        found = probes.get(run.dataset)
        problem = found.error if found is not None and found.error else sw.shots_problem(run, probes)
        state, diffs = states[run.key]
        mismatched += state == sw.OTHER_SETTINGS  # refused before any work, whether it could run or not
        if problem:
            cannot += 1
            note = f"cannot run: {problem}"
        else:
            total += steps or 0
            left += 0 if state == sw.FINISHED else steps or 0
            note = _folder_note(state, diffs, replace)
        targets = f" -> {', '.join(run.targets)}" if run.targets else ""
        print(f"  {run.key}{targets}: {epochs} epoch{'s' if epochs != 1 else ''}, "
              f"{steps if steps is not None else '?'} step{'s' if steps != 1 else ''} ({note})", file=file)
    print(f"training steps: {total} in all, {left} still to run", file=file)
    missing = {name: p for name, p in probes.items() if p.error}
    for name, p in probes.items():
        line = f"{p.classes} classes" if not p.error else f"MISSING: {p.error}"
        print(f"  dataset {name}: {p.folder} ({line})", file=file)
    if missing:
        print(f"{len(missing)} dataset(s) missing or malformed: their runs would be recorded as failed",
              file=file)
    if cannot:
        print(f"{cannot} run(s) cannot run (above): they would be recorded as failed, before any training", file=file)
    if mismatched and not replace:
        print(f"{mismatched} run(s) hold other settings: the sweep would refuse to start; --no-resume trains them "
              "again with these settings, or use another --out", file=file)


def run(args) -> int:
    from skipkernels.reproduce import sweep as sw
    from skipkernels.reproduce import tables
    from skipkernels.train.checkpoint import CheckpointError
    if args.tables_only:
        if not Path(args.out).is_dir():
            raise FileNotFoundError(f"--out {args.out}: no sweep folder there")
        summary = tables.write(args.out, args.compare_paper)
        _print_written(args.out, summary)
        return 0
    sweep, runs, shard = build_sweep(args)
    needed = dict.fromkeys(d for r in runs for d in (r.dataset, *r.targets))
    probes = {name: sw.probe(sweep.data_root, name) for name in needed}
    states = {run.key: sw.folder_state(sweep, run) for run in sw.shard_of(runs, shard)}
    if args.dry_run:
        dry_run(sweep, runs, probes, shard, states, args.no_resume)
        return 0
    mismatched = [(run, states[run.key][1]) for run in sw.shard_of(runs, shard)
                  if states[run.key][0] == sw.OTHER_SETTINGS]
    if mismatched and not args.no_resume:  # before any work: nothing is trained, nothing rewritten
        raise CheckpointError(sw.other_settings_message(args.out, mismatched))
    outcome = sw.run_sweep(sweep, runs, probes, shard, replace=args.no_resume, states=states)
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
