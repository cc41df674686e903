"""The sweep's tables in the paper's shape, built from whatever runs have finished.

- base-to-new: one row per dataset and method, base / new / HM, and the average row. Per dataset,
  base and new are the mean ± std over seeds, HM is the HM of those means (± the std of the
  per-seed HMs). The average row is the mean over datasets of base and of new, and the HM of
  those two means, as the paper's Table 1 (85.04 / 77.53 -> 81.11).
- few-shot: one row per dataset and method, the accuracy per shot count, and the average row.
- cross-dataset and DG: one row per method, the source and each target, and the targets' average.

Base-to-new, cross-dataset and DG runs of several shot counts get one row per shot count. Every
average says what it covers: ``Average (all 11 datasets)`` only when it covers the paper's whole
set, else ``Average (3 datasets)``; the paper's rows follow the same rule, so a paper average sits
beside ours only when both cover the same datasets.

The std is over seeds, numpy's default (ddof 0), as CoOp's ``parse_test_res.py``; an average's
std is that of the per-seed averages, over the seeds every dataset has. A cell with fewer seeds
than its table says so (``(seeds: 1 of 2)``). An average is given only when every dataset of the
table has a result for that method. ``table.csv`` holds every cell of ``table.md`` (protocol, row,
method, column, mean, std, seeds, status).

Each table's caption states the settings its runs ran with, read from their own ``results.json``
(so ``--tables-only`` is right too), and names every setting in which its runs differ. A run whose
``results.json`` was made with other settings than its ``sweep_run.json`` names, or that failed,
is listed in the runs table with that status and gives no number.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from skipkernels.reproduce.protocols import (DEFAULT_MODES, DISPLAY, ELEVEN, PROTOCOL_FIELDS, PROTOCOLS,
                                             QUARTER_RULE, ZERO_SHOT, describe_rates, display, protocol_settings)
from skipkernels.reproduce.sweep import FAILED_NAME, SPEC_NAME, TRANSFER_NAME, read_json, results_differences
from skipkernels.train.checkpoint import atomic_write_text
from skipkernels.train.evaluate import harmonic_mean
from skipkernels.train.run_folder import RESULTS_NAME
from skipkernels.train.trainer import QUARTER_EPOCH_DATASETS, protocol_epochs

PAPER_FILE = Path(__file__).with_name("paper_numbers.json")
METHODS = {"skip": "Skip Tuning", "ft": "FT", "coop": "CoOp", "zero-shot": "CLIP (zero-shot)"}
CSV_COLUMNS = ("protocol", "row", "method", "column", "mean", "std", "seeds", "status")
# Identity keys that differ between the runs of a table by design: per dataset, seed, shots or method.
PER_RUN_KEYS = {"dataset", "train_items", "test_items", "skip_config.mode", "train_config.seed", "train_config.shots",
                "train_config.epochs"}
SHOWN_TRAIN = PROTOCOL_FIELDS + ("batch_size",)


def method_name(mode: str) -> str:
    return METHODS.get(mode, mode)


def paper_numbers() -> dict:
    return json.loads(PAPER_FILE.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ reading the runs
def collect(out) -> list[dict]:
    """One record per run folder under ``out`` (``OUT/<protocol>/<dataset>/seed<S>/shots<N>/<mode>``)."""
    records = []
    for folder in sorted(Path(out).glob("*/*/seed*/shots*/*")):
        protocol, dataset, seed, shots, mode = folder.relative_to(out).parts
        if protocol not in PROTOCOLS or not folder.is_dir():
            continue
        try:
            seed, shots = int(seed[len("seed"):]), int(shots[len("shots"):])
        except ValueError:
            continue
        results = read_json(folder / RESULTS_NAME) or {}
        failed = read_json(folder / FAILED_NAME)
        spec = read_json(folder / SPEC_NAME) or {}
        transfer = read_json(folder / TRANSFER_NAME) or {}
        targets = tuple((spec.get("run") or {}).get("targets") or transfer)
        mismatch = results_differences(spec, results, mode != ZERO_SHOT) if spec else []
        error = (failed or {}).get("error")
        if failed:
            status = "failed"
        elif mismatch:
            status = "other settings"
            error = f"its results.json was made with other settings than its {SPEC_NAME}: {'; '.join(mismatch)}"
        elif results.get("finished") and all("accuracy" in (transfer.get(t) or {}) for t in targets):
            status = "done"
        elif results.get("finished"):
            status = "targets failed" if any("error" in (transfer.get(t) or {}) for t in targets) else "incomplete"
        else:
            status = "incomplete"
        times = results.get("time_s") or {}
        records.append({
            "protocol": protocol, "dataset": dataset, "seed": seed, "shots": shots, "mode": mode,
            "folder": str(folder), "status": status, "error": error,
            "finished": bool(results.get("finished")),
            # only a finished run of the settings it records gives numbers
            "usable": bool(results.get("finished")) and status not in ("failed", "other settings"),
            "accuracy": results.get("accuracy") or {},
            "targets": {t: transfer.get(t) or {} for t in targets},
            "train_s": times.get("train"), "cache_s": times.get("cache"), "eval_s": times.get("eval"),
            "peak_train_memory_mb": results.get("peak_train_memory_mb"),
            "model": results.get("model") or spec.get("model"),
            "train_config": results.get("train_config") if mode != ZERO_SHOT else None,
            "identity": results.get("identity") or {},
        })
    return records


def run_key(r: dict) -> str:
    return f"{r['protocol']}/{r['dataset']}/seed{r['seed']}/shots{r['shots']}/{r['mode']}"


# ------------------------------------------------------------------ cells
def _cell(values: list[float], failed: bool = False) -> dict:
    if not values:
        return {"mean": None, "std": None, "seeds": 0, "status": "failed" if failed else "missing"}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "seeds": len(values), "status": "ok"}


def _fixed(mean: float, std: float | None, seeds: int | None) -> dict:
    return {"mean": mean, "std": std, "seeds": seeds, "status": "ok"}


def fmt(cell: dict, seeds: int | None = None) -> str:
    """A cell as table.md shows it; ``seeds``: how many seeds its table has (a cell with fewer says so)."""
    if cell["status"] != "ok":
        return {"failed": "failed", "missing": "–"}.get(cell["status"], cell["status"])
    text = f"{cell['mean']:.2f}" if cell["std"] is None or (cell["seeds"] or 0) < 2 else \
        f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if seeds and cell["seeds"] is not None and cell["seeds"] < seeds:
        text += f" (seeds: {cell['seeds']} of {seeds})"
    return text


def _order(names, first) -> list:
    names = set(names)
    return [n for n in first if n in names] + sorted(names - set(first))


def _by_seed(records, value) -> dict:
    """{seed: value(record)} of the usable records where value is known."""
    out = {}
    for r in records:
        if r["usable"]:
            v = value(r)
            if v is not None:
                out[r["seed"]] = v
    return out


def _average(per_dataset: list[dict], combine=statistics.fmean):
    """The mean over datasets of their seed means, and the std of the per-seed averages over the
    seeds every dataset has. ``per_dataset``: one {seed: value} per dataset (all non-empty)."""
    mean = combine([statistics.fmean(d.values()) for d in per_dataset])
    common = set.intersection(*(set(d) for d in per_dataset))
    per_seed = [combine([d[s] for d in per_dataset]) for s in sorted(common)]
    return mean, statistics.pstdev(per_seed) if per_seed else None, len(common)


def _acc(key):
    return lambda r: (r["accuracy"] or {}).get(key)


def _target(name):
    return lambda r: (r["targets"].get(name) or {}).get("accuracy")


def _failed(records) -> bool:
    return any(r["status"] in ("failed", "other settings") for r in records)


def average_label(covered, whole, noun: str) -> str:
    """What an average covers: ``Average (all 11 datasets)`` when ``covered`` is the whole set
    ``whole``, else ``Average (3 datasets)``."""
    covered = list(covered)
    if whole and set(covered) == set(whole):
        return f"Average (all {len(covered)} {noun})"
    return f"Average ({len(covered)} {noun if len(covered) != 1 else noun[:-1]})"


def _shots(n: int) -> str:
    return f"{n} shot{'s' if n != 1 else ''}"


def _method(mode: str, shots: int, split: bool) -> str:
    return method_name(mode) + (f" ({_shots(shots)})" if split else "")


def _row(row: str, kind: str, mode, method: str, cells: dict, **extra) -> dict:
    return {"row": row, "kind": kind, "method": method, "mode": mode, "cells": cells, **extra}


def base2new_table(records: list[dict], protocol: str = "base2new") -> list[dict]:
    rows = []
    datasets = _order({r["dataset"] for r in records}, ELEVEN)
    modes = _order({r["mode"] for r in records}, DEFAULT_MODES)
    shot_counts = sorted({r["shots"] for r in records})
    split = len(shot_counts) > 1  # one row per shot count: never one seed's run of each mixed into a cell
    for dataset in datasets:
        for shots in shot_counts:
            for mode in modes:
                rs = [r for r in records if r["dataset"] == dataset and r["mode"] == mode and r["shots"] == shots]
                if not rs:
                    continue
                base, new = _by_seed(rs, _acc("base")), _by_seed(rs, _acc("new"))
                cells = {"Base": _cell(list(base.values()), _failed(rs)),
                         "New": _cell(list(new.values()), _failed(rs))}
                seeds = sorted(set(base) & set(new))
                if seeds:
                    hms = [harmonic_mean(base[s], new[s]) for s in seeds]
                    cells["HM"] = _fixed(harmonic_mean(cells["Base"]["mean"], cells["New"]["mean"]),
                                         statistics.pstdev(hms), len(seeds))
                else:
                    cells["HM"] = _cell([], _failed(rs))
                rows.append(_row(display(dataset), "dataset", mode, _method(mode, shots, split), cells, shots=shots))
    label = average_label(datasets, ELEVEN, "datasets")
    for shots in shot_counts:
        for mode in modes:
            per = [(_by_seed(rs, _acc("base")), _by_seed(rs, _acc("new")))
                   for rs in ([r for r in records if r["dataset"] == d and r["mode"] == mode and r["shots"] == shots]
                              for d in datasets)]
            if not any(r["mode"] == mode and r["shots"] == shots for r in records):
                continue
            if all(b and n for b, n in per):
                b_mean, b_std, b_n = _average([b for b, _ in per])
                n_mean, n_std, n_n = _average([n for _, n in per])
                common = set.intersection(*(set(b) & set(n) for b, n in per))
                hms = [harmonic_mean(statistics.fmean(b[s] for b, _ in per),
                                     statistics.fmean(n[s] for _, n in per)) for s in sorted(common)]
                cells = {"Base": _fixed(b_mean, b_std, b_n), "New": _fixed(n_mean, n_std, n_n),
                         "HM": _fixed(harmonic_mean(b_mean, n_mean), statistics.pstdev(hms) if hms else None,
                                      len(common))}
            else:
                cells = {c: _cell([]) for c in ("Base", "New", "HM")}
            rows.append(_row(label, "average", mode, _method(mode, shots, split), cells, shots=shots,
                             covers=datasets))
    return rows


def fewshot_table(records: list[dict], protocol: str = "fewshot") -> list[dict]:
    rows = []
    datasets = _order({r["dataset"] for r in records}, ELEVEN)
    modes = _order({r["mode"] for r in records}, DEFAULT_MODES)
    shots = sorted({r["shots"] for r in records})
    for dataset in datasets:
        for mode in modes:
            rs = [r for r in records if r["dataset"] == dataset and r["mode"] == mode]
            if rs:
                rows.append(_row(display(dataset), "dataset", mode, method_name(mode), {
                    _shots(n): _cell(list(_by_seed([r for r in rs if r["shots"] == n], _acc("all")).values()),
                                     _failed([r for r in rs if r["shots"] == n])) for n in shots}))
    label = average_label(datasets, ELEVEN, "datasets")
    for mode in modes:
        cells = {}
        for n in shots:
            per = [_by_seed([r for r in records if r["dataset"] == d and r["mode"] == mode and r["shots"] == n],
                            _acc("all")) for d in datasets]
            cells[_shots(n)] = _fixed(*_average(per)) if all(per) else _cell([])
        rows.append(_row(label, "average", mode, method_name(mode), cells, covers=datasets))
    return rows


def transfer_table(records: list[dict], protocol: str = "cross") -> list[dict]:
    rows = []
    modes = _order({r["mode"] for r in records}, DEFAULT_MODES)
    sources = sorted({r["dataset"] for r in records})
    shot_counts = sorted({r["shots"] for r in records})
    split = len(shot_counts) > 1
    for source in sources:
        targets = _order({t for r in records if r["dataset"] == source for t in r["targets"]}, list(DISPLAY))
        whole = PROTOCOLS[protocol].datasets if source == PROTOCOLS[protocol].source else ()
        label = average_label(targets, whole, "targets")
        for shots in shot_counts:
            for mode in modes:
                rs = [r for r in records if r["dataset"] == source and r["mode"] == mode and r["shots"] == shots]
                if not rs:
                    continue
                cells = {f"Source: {display(source)}": _cell(list(_by_seed(rs, _acc("all")).values()), _failed(rs))}
                per = []
                for t in targets:
                    values = _by_seed(rs, _target(t))
                    failed = _failed(rs) or any("error" in r["targets"].get(t, {}) for r in rs)
                    cells[display(t)] = _cell(list(values.values()), failed)
                    per.append(values)
                cells[label] = _fixed(*_average(per)) if per and all(per) else _cell([])
                method = _method(mode, shots, split)
                name = method + (f", from {display(source)}" if len(sources) > 1 else "")
                rows.append(_row(name, "method", mode, method, cells, shots=shots, covers=targets))
    return rows


TABLES = {"base2new": base2new_table, "fewshot": fewshot_table, "cross": transfer_table, "dg": transfer_table}


# ------------------------------------------------------------------ the paper's rows
def _paper_row(row: str, method: str, values: dict, columns, kind: str = "paper") -> dict:
    cells = {c: _fixed(values[k], None, None) if values.get(k) is not None else _cell([]) for c, k in columns}
    return _row(row, kind, None, f"{method} (paper)", cells)


def paper_rows(protocol: str, rows: list[dict]) -> list[dict]:
    """The paper's published rows for ``protocol`` (``paper_numbers.json``) that compare with
    ``rows``: base-to-new's for each of their datasets, the paper's average over the same datasets
    (from its per-dataset numbers) where ours covers fewer than all 11, and its published averages,
    labelled with the datasets they cover; cross-dataset's and DG's source and all-targets average."""
    numbers = paper_numbers().get(protocol) or {}
    if protocol == "base2new":
        columns = (("Base", "base"), ("New", "new"), ("HM", "hm"))
        per = numbers.get("datasets") or {}
        keys = {display(d): d for d in ELEVEN}
        ours = [keys[r["row"]] for r in rows if r["kind"] == "dataset" and r["row"] in keys]
        out = [_paper_row(display(d), method, values, columns)
               for d in dict.fromkeys(ours) for method, values in per.get(d, {}).items()]
        whole = average_label(ELEVEN, ELEVEN, "datasets")
        for label, covers in {r["row"]: r["covers"] for r in rows if r["kind"] == "average"}.items():
            methods = set.intersection(*(set(per.get(d, {})) for d in covers)) if covers else set()
            if label == whole or not methods:
                continue
            for method in sorted(methods, key=list(per[covers[0]]).index):
                base = statistics.fmean(per[d][method]["base"] for d in covers)
                new = statistics.fmean(per[d][method]["new"] for d in covers)
                out.append(_paper_row(label, method, {"base": base, "new": new, "hm": harmonic_mean(base, new)},
                                      columns, kind="paper average"))
        return out + [_paper_row(whole, method, values, columns, kind="paper average")
                      for method, values in (numbers.get("average") or {}).items()]
    if protocol not in PROTOCOLS or not numbers.get("methods"):
        return []
    p = PROTOCOLS[protocol]
    columns = ((f"Source: {display(p.source)}", "source"), (average_label(p.datasets, p.datasets, "targets"),
                                                            "average"))
    return [_paper_row(f"{method} (paper)", method, values, columns, kind="paper average")
            for method, values in numbers["methods"].items()]


def with_paper_rows(protocol: str, rows: list[dict]) -> list[dict]:
    """``rows`` with the paper's beside them: each dataset's after ours for that dataset, the
    averages (or the transfer rows) at the end."""
    paper = paper_rows(protocol, rows)
    out = []
    for r, following in zip(rows, rows[1:] + [None]):
        out.append(r)
        if r["kind"] == "dataset" and (following is None or following["row"] != r["row"]):  # its last row
            out += [p for p in paper if p["kind"] == "paper" and p["row"] == r["row"]]
    return out + [p for p in paper if p["kind"] == "paper average"]


def paper_notes(protocol: str, rows: list[dict]) -> list[str]:
    """What the paper's rows beside ours are, where a reader could take them for something else."""
    numbers = paper_numbers()
    paper = [r for r in rows if r["mode"] is None]
    ours = [r for r in rows if r["mode"] is not None and r["kind"] in ("average", "method")]
    notes = []
    if not paper:
        return notes
    notes.append("The paper's rows are its ViT-B/16 runs with 16 shots and 3 seeds.")
    if protocol == "base2new":
        derived = sorted({r["row"] for r in paper if r["kind"] == "paper average"} - {"Average (all 11 datasets)"})
        if derived:
            notes.append(f"Paper rows \"{derived[0]}\": the mean of the paper's per-dataset base and new accuracy over "
                         "the datasets above (it gives them for Skip Tuning and CoOp only) and the HM of those means. "
                         "Paper rows \"Average (all 11 datasets)\": its published averages, over all 11 datasets.")
        notes += [f"Misprint in the source, {key}: {text}." for key, text in (numbers.get("misprints") or {}).items()
                  if key.split("/")[0] == protocol]
    else:
        theirs = {c for r in paper for c in r["cells"] if c.startswith("Average")}
        mine = {c for r in ours for c in r["cells"] if c.startswith("Average")}
        if mine - theirs:
            notes.append(f"The paper's average covers its targets (\"{', '.join(sorted(theirs))}\"), ours the targets "
                         f"above (\"{', '.join(sorted(mine))}\"): they are different averages, in separate columns.")
    return notes


# ------------------------------------------------------------------ what ran
def _values(text_of, records) -> dict:
    """{value text: [records]} of ``records``."""
    out: dict = {}
    for r in records:
        out.setdefault(text_of(r), []).append(r)
    return out


def _runs_text(records, limit: int = 2) -> str:
    keys = [run_key(r) for r in records]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _epochs_text(trained: list[dict]) -> str:
    by_value = _values(lambda r: r["train_config"].get("epochs"), trained)
    if len(by_value) == 1:
        (epochs,) = by_value
        return f"{epochs} epoch{'s' if epochs != 1 else ''}"
    groups = [f"{epochs} ({', '.join(display(d) for d in dict.fromkeys(r['dataset'] for r in rs))})"
              for epochs, rs in sorted(by_value.items(), key=lambda kv: -kv[0])]
    return "epochs " + ", ".join(groups)


def _by_value_text(by_value: dict) -> str:
    return "; ".join(f"{value} in {len(rs)} run{'s' if len(rs) != 1 else ''} ({_runs_text(rs)})"
                     for value, rs in by_value.items())


def differing_settings(trained: list[dict]) -> list[str]:
    """Each setting in which the trained runs of one table differ, with the runs of each value;
    the epochs only where runs of one dataset differ (the quarter rule sets them per dataset)."""
    out = []
    for key in dict.fromkeys(k for r in trained for k in r["identity"] if k not in PER_RUN_KEYS):
        by_value = _values(lambda r: json.dumps(r["identity"].get(key), sort_keys=True), trained)
        if len(by_value) > 1:
            out.append(f"{key}: {_by_value_text(by_value)}")
    for dataset, rs in _values(lambda r: r["dataset"], trained).items():
        by_value = _values(lambda r: r["train_config"].get("epochs"), rs)
        if len(by_value) > 1:
            out.append(f"epochs on {display(dataset)}: {_by_value_text(by_value)}")
    return out


def _non_default(trained: list[dict]) -> list[str]:
    """Settings every trained run shares that are not finetune's defaults (besides those shown)."""
    from skipkernels.options import identity_fields
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.trainer import TrainConfig
    shown = {f"train_config.{k}" for k in SHOWN_TRAIN} | PER_RUN_KEYS
    out = []
    for section, cls in (("skip_config", SkipConfig), ("train_config", TrainConfig)):
        for f in identity_fields(cls):
            key = f"{section}.{f.name}"
            values = {json.dumps(r["identity"].get(key, f.default)) for r in trained}
            if key not in shown and len(values) == 1 and json.loads(next(iter(values))) != f.default:
                out.append(_setting_text(f.name, json.loads(next(iter(values)))))
    return out


def _setting_text(name: str, value) -> str:
    """A setting as the command line spells it. A run's identity records ``--top-count T`` as the
    older top_ratio T (SkipConfig.canonical_identity): a ratio above 1 is a count of classes."""
    if name == "top_ratio" and isinstance(value, (int, float)) and value > 1:
        count = math.ceil(value)
        return f"top-count {count}" + ("" if count == value else f" (given as top-ratio {value:g})")
    return f"{name.replace('_', '-')} {value}"


def settings_of_table(protocol: str, records: list[dict]) -> dict:
    """What the table's caption says: the settings its runs ran with (from their results.json),
    the protocol's own, and each setting in which its runs differ."""
    usable = [r for r in records if r["usable"]]
    trained = [r for r in usable if r["mode"] != ZERO_SHOT and isinstance(r["train_config"], dict)]
    parts = []
    models = sorted({str(r["model"]) for r in usable if r["model"]})
    if models:
        parts.append(f"model {models[0]}" if len(models) == 1 else f"models {', '.join(models)}")
    if trained:
        parts.append(_epochs_text(trained))
        rates = _values(lambda r: describe_rates(r["train_config"]), trained)
        parts.append(next(iter(rates)) if len(rates) == 1 else "learning rates that differ between runs (below)")
        batches = {r["train_config"].get("batch_size") for r in trained}
        parts.append(f"batch {batches.pop()}" if len(batches) == 1 else "batch sizes that differ between runs (below)")
        parts += _non_default(trained)
    elif any(r["mode"] != ZERO_SHOT for r in records):
        parts.append("no trained run has finished")
    else:
        parts.append("zero-shot only: nothing trained")
    if protocol != "fewshot":
        shots = sorted({r["shots"] for r in records})
        parts.append(f"{_shots(shots[0])} per class" if len(shots) == 1 else
                     f"{', '.join(map(str, shots))} shots per class (a row for each)")
    seeds = sorted({r["seed"] for r in records})
    parts.append(f"seed {seeds[0]}" if len(seeds) == 1 else
                 f"seeds {', '.join(map(str, seeds))} (mean ± std over seeds)")
    own = PROTOCOLS[protocol].train
    matches = bool(trained) and all(
        r["train_config"].get(k) == (protocol_epochs(r["dataset"], own[k]) if k == "epochs" else own[k])
        for r in trained for k in PROTOCOL_FIELDS)
    quarter = any(r["dataset"] in QUARTER_EPOCH_DATASETS for r in trained)
    return {"ran": "; ".join(parts), "protocol": protocol_settings(protocol), "protocol_settings_used": matches,
            "quarter_rule": quarter, "differ": differing_settings(trained), "seeds": len(seeds)}


def caption(settings: dict) -> list[str]:
    lines = [f"Settings of these runs (from their results.json): {settings['ran']}."]
    own = "These are the protocol's settings" if settings["protocol_settings_used"] else "The protocol's own settings"
    lines.append(f"{own}: {settings['protocol']}."
                 + (f" {QUARTER_RULE}." if settings["quarter_rule"] else ""))
    if settings["differ"]:
        lines.append("**The runs of this table ran under different settings**: " + " | ".join(settings["differ"])
                     + ". Its averages mix them.")
    return lines


# ------------------------------------------------------------------ writing
def _markdown_table(rows: list[dict], first: tuple[str, ...], seeds: int | None = None) -> list[str]:
    columns = list(dict.fromkeys(c for r in rows for c in r["cells"]))
    lines = ["| " + " | ".join(list(first) + columns) + " |", "|" + " --- |" * (len(first) + len(columns))]
    for r in rows:
        lead = [f"**{r['row']}**" if r["row"].startswith("Average") else r["row"], r["method"]][:len(first)]
        lines.append("| " + " | ".join(lead + [fmt(r["cells"].get(c, _cell([])), seeds) for c in columns]) + " |")
    return lines


def _num(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _result_text(r: dict) -> str:
    if r["status"] in ("failed", "other settings"):
        return (r["error"] or r["status"]).replace("|", "/")
    parts = [f"{k} {v:.2f}" for k, v in r["accuracy"].items()]
    parts += [f"{display(t)} {e['accuracy']:.2f}" if "accuracy" in e else f"{display(t)} failed"
              for t, e in r["targets"].items()]
    return ", ".join(parts).replace("|", "/")


def build(out, compare_paper: bool = False) -> dict:
    """The summary of every run under ``out``: tables, runs, failures (``summary.json``'s content)."""
    records = collect(out)
    summary = {"out": str(Path(out).resolve()), "protocols": {}, "failed": [], "incomplete": []}
    for protocol in PROTOCOLS:
        rs = [r for r in records if r["protocol"] == protocol]
        if not rs:
            continue
        rows = TABLES[protocol](rs, protocol)
        if compare_paper:
            rows = with_paper_rows(protocol, rows)
        settings = settings_of_table(protocol, rs)
        summary["protocols"][protocol] = {
            "title": PROTOCOLS[protocol].title, "settings": settings, "caption": caption(settings),
            "paper_notes": paper_notes(protocol, rows) if compare_paper else [], "rows": rows,
            "runs": [{k: v for k, v in r.items() if k != "identity"} for r in rs]}
        summary["failed"] += [{"run": r["folder"], "error": r["error"]} for r in rs
                              if r["status"] in ("failed", "other settings")]
        summary["incomplete"] += [r["folder"] for r in rs if r["status"] in ("incomplete", "targets failed")]
    if compare_paper:
        summary["paper"] = paper_numbers()
    return summary


def markdown(summary: dict, compare_paper: bool = False) -> str:
    lines = ["# Skip Tuning: the paper's evaluation", ""]
    for protocol, part in summary["protocols"].items():
        lines += [f"## {part['title']}", ""] + part["caption"] + [""]
        first = ("Method",) if PROTOCOLS[protocol].transfer else ("Dataset", "Method")
        lines += _markdown_table(part["rows"], first, part["settings"]["seeds"]) + [""]
        if part["paper_notes"]:
            lines += part["paper_notes"] + [""]
        elif compare_paper and protocol not in paper_numbers():
            lines += [f"The paper's numbers for this protocol are not shipped "
                      f"({PAPER_FILE.name} has {', '.join(p for p in paper_numbers() if p in PROTOCOLS)}).", ""]
    if compare_paper:
        lines += [f"Paper rows: {paper_numbers()['source']}", ""]
    lines += ["## Runs: train time and peak memory", "",
              "| Run | Status | Train s | Cache s | Peak train MB | Result |", "| --- | --- | --- | --- | --- | --- |"]
    for part in summary["protocols"].values():
        for r in part["runs"]:
            lines.append(f"| {run_key(r)} | {r['status']} | {_num(r['train_s'])} | {_num(r['cache_s'])} | "
                         f"{_num(r['peak_train_memory_mb'])} | {_result_text(r)} |")
    return "\n".join(lines) + "\n"


def csv_text(summary: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for protocol, part in summary["protocols"].items():
        for r in part["rows"]:
            for column, cell in r["cells"].items():
                writer.writerow([protocol, r["row"], r["method"], column,
                                 "" if cell["mean"] is None else f"{cell['mean']:.4f}",
                                 "" if cell["std"] is None else f"{cell['std']:.4f}",
                                 "" if cell["seeds"] is None else cell["seeds"], cell["status"]])
    return buffer.getvalue()


def _paper_markers(rows: list[dict], mode: str, key, bars) -> dict:
    """{bar name: the paper's value} of the paper's rows for ``mode``'s method, for the bars among
    ``bars``; ``key(row, column)`` names the bar a paper cell belongs to (None: none)."""
    marks = {}
    for r in rows:
        if r["mode"] is None and r["method"] == f"{method_name(mode)} (paper)":
            for column, cell in r["cells"].items():
                name = key(r, column)
                if name in bars and cell["status"] == "ok":
                    marks[name] = cell["mean"]
    return marks


def plot(summary: dict, out: Path) -> list[Path]:
    """One chart per protocol: HM per dataset (base-to-new), accuracy against shots (few-shot),
    accuracy per target (cross-dataset, DG). Panels of one chart share their y-axis; with the
    paper's rows in the summary, its numbers for the same bars are drawn as black marks. Without
    matplotlib: none, with a message."""
    from skipkernels.plots import _new_figure, _save, bar_chart
    drawn = []
    for protocol, part in summary["protocols"].items():
        path = Path(out) / f"{protocol}.png"
        rows = [r for r in part["rows"] if r["mode"] is not None]
        if protocol == "fewshot":
            averages = [r for r in rows if r["kind"] == "average"]
            lines = [(r["method"], [(int(c.split()[0]), v["mean"]) for c, v in r["cells"].items()
                                    if v["status"] == "ok"]) for r in averages]
            lines = [(label, points) for label, points in lines if points]
            if not lines:  # no average has a number: no empty chart
                continue
            figure = _new_figure(path, figsize=(5.5, 4), layout="constrained")
            if figure is None:
                return drawn
            ax = figure.subplots()
            for label, points in lines:
                ax.plot(*zip(*points), marker="o", label=label)
            ax.set(xscale="log", xlabel="shots per class", ylabel=f"accuracy %, {averages[0]['row']}")
            ax.set_xticks(sorted({r["shots"] for r in part["runs"]}), labels=None)
            ax.get_xaxis().set_major_formatter("{x:g}")
            ax.legend(fontsize="small")
            figure.suptitle(part["title"], fontsize="medium")
            _save(figure, path)
        else:
            panels, markers = [], []
            if protocol == "base2new":
                for method in dict.fromkeys(r["method"] for r in rows):
                    mine = [r for r in rows if r["method"] == method]
                    values = {r["row"]: r["cells"]["HM"]["mean"] for r in mine if r["cells"]["HM"]["status"] == "ok"}
                    if values:
                        panels.append((f"{method}: HM %", values))
                        markers.append(_paper_markers(part["rows"], mine[0]["mode"],
                                                      lambda r, c: r["row"] if c == "HM" else None, values))
            else:
                for r in rows:
                    values = {c: v["mean"] for c, v in r["cells"].items()
                              if v["status"] == "ok" and not c.startswith("Source")}
                    if values:
                        panels.append((f"{r['row']}: accuracy %", values))
                        markers.append(_paper_markers(part["rows"], r["mode"], lambda _, c: c, values))
            if not panels or not bar_chart(panels, path, part["title"], share_y=True,
                                           markers=markers if any(markers) else None, marker_label="paper"):
                continue
        drawn.append(path)
    return drawn


def write(out, compare_paper: bool = False, plots: bool = True) -> dict:
    """``OUT/table.md``, ``OUT/table.csv``, ``OUT/summary.json`` and a chart per protocol."""
    out = Path(out)
    summary = build(out, compare_paper)
    atomic_write_text(markdown(summary, compare_paper), out / "table.md")
    atomic_write_text(csv_text(summary), out / "table.csv")
    atomic_write_text(json.dumps(summary, indent=2, default=str), out / "summary.json")
    summary["charts"] = [str(p) for p in plot(summary, out)] if plots else []
    return summary

