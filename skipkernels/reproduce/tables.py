"""The sweep's tables in the paper's shape, built from whatever runs have finished.

- base-to-new: one row per dataset and method, base / new / HM, and the average row. Per dataset,
  base and new are the mean ± std over seeds, HM is the HM of those means (± the std of the
  per-seed HMs). The average row is the mean over datasets of base and of new, and the HM of
  those two means, as the paper's Table 1 (85.04 / 77.53 -> 81.11).
- few-shot: one row per dataset and method, the accuracy per shot count, and the average row.
- cross-dataset and DG: one row per method, the source and each target, and the targets' average.

The std is over seeds, numpy's default (ddof 0), as CoOp's ``parse_test_res.py``; an average's
std is that of the per-seed averages, over the seeds every dataset has. An average is given only
when every dataset of the table has a result for that method. ``table.csv`` holds every cell of
``table.md`` (protocol, row, method, column, mean, std, seeds, status).
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from skipkernels.reproduce.protocols import (DEFAULT_MODES, DISPLAY, ELEVEN, PROTOCOLS, QUARTER_RULE, SETTINGS_SOURCES,
                                             display)
from skipkernels.reproduce.sweep import FAILED_NAME, SPEC_NAME, TRANSFER_NAME
from skipkernels.train.checkpoint import atomic_write_text
from skipkernels.train.evaluate import harmonic_mean
from skipkernels.train.run_folder import RESULTS_NAME

PAPER_FILE = Path(__file__).with_name("paper_numbers.json")
METHODS = {"skip": "Skip Tuning", "ft": "FT", "coop": "CoOp", "zero-shot": "CLIP (zero-shot)"}
CSV_COLUMNS = ("protocol", "row", "method", "column", "mean", "std", "seeds", "status")


def method_name(mode: str) -> str:
    return METHODS.get(mode, mode)


def paper_numbers() -> dict:
    return json.loads(PAPER_FILE.read_text(encoding="utf-8"))


# ------------------------------------------------------------------ reading the runs
def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
        results = _read(folder / RESULTS_NAME) or {}
        failed = _read(folder / FAILED_NAME)
        spec = _read(folder / SPEC_NAME) or {}
        transfer = _read(folder / TRANSFER_NAME) or {}
        targets = tuple((spec.get("run") or {}).get("targets") or transfer)
        if failed:
            status = "failed"
        elif results.get("finished") and all("accuracy" in (transfer.get(t) or {}) for t in targets):
            status = "done"
        elif results.get("finished"):
            status = "targets failed" if any("error" in (transfer.get(t) or {}) for t in targets) else "incomplete"
        else:
            status = "incomplete"
        times = results.get("time_s") or {}
        records.append({
            "protocol": protocol, "dataset": dataset, "seed": seed, "shots": shots, "mode": mode,
            "folder": str(folder), "status": status, "error": (failed or {}).get("error"),
            "finished": bool(results.get("finished")), "accuracy": results.get("accuracy") or {},
            "targets": {t: transfer.get(t) or {} for t in targets},
            "train_s": times.get("train"), "cache_s": times.get("cache"), "eval_s": times.get("eval"),
            "peak_train_memory_mb": results.get("peak_train_memory_mb"),
        })
    return records


# ------------------------------------------------------------------ cells
def _cell(values: list[float], failed: bool = False) -> dict:
    if not values:
        return {"mean": None, "std": None, "seeds": 0, "status": "failed" if failed else "missing"}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "seeds": len(values), "status": "ok"}


def _fixed(mean: float, std: float | None, seeds: int) -> dict:
    return {"mean": mean, "std": std, "seeds": seeds, "status": "ok"}


def fmt(cell: dict) -> str:
    if cell["status"] != "ok":
        return {"failed": "failed", "missing": "–"}.get(cell["status"], cell["status"])
    if cell["std"] is None or cell["seeds"] < 2:
        return f"{cell['mean']:.2f}"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f}"


def _order(names, first) -> list:
    names = set(names)
    return [n for n in first if n in names] + sorted(names - set(first))


def _by_seed(records, value) -> dict:
    """{seed: value(record)} of the finished records where value is known."""
    out = {}
    for r in records:
        if r["finished"]:
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
    return any(r["status"] == "failed" for r in records)


def base2new_table(records: list[dict]) -> list[dict]:
    rows = []
    datasets = _order({r["dataset"] for r in records}, ELEVEN)
    modes = _order({r["mode"] for r in records}, DEFAULT_MODES)
    for dataset in datasets:
        for mode in modes:
            rs = [r for r in records if r["dataset"] == dataset and r["mode"] == mode]
            if not rs:
                continue
            base, new = _by_seed(rs, _acc("base")), _by_seed(rs, _acc("new"))
            cells = {"Base": _cell(list(base.values()), _failed(rs)), "New": _cell(list(new.values()), _failed(rs))}
            seeds = sorted(set(base) & set(new))
            if seeds:
                hms = [harmonic_mean(base[s], new[s]) for s in seeds]
                cells["HM"] = _fixed(harmonic_mean(cells["Base"]["mean"], cells["New"]["mean"]),
                                     statistics.pstdev(hms), len(seeds))
            else:
                cells["HM"] = _cell([], _failed(rs))
            rows.append({"row": display(dataset), "method": method_name(mode), "mode": mode, "cells": cells})
    for mode in modes:
        per = [(_by_seed(rs, _acc("base")), _by_seed(rs, _acc("new")))
               for rs in ([r for r in records if r["dataset"] == d and r["mode"] == mode] for d in datasets)]
        if all(b and n for b, n in per):
            b_mean, b_std, b_n = _average([b for b, _ in per])
            n_mean, n_std, n_n = _average([n for _, n in per])
            common = set.intersection(*(set(b) & set(n) for b, n in per))
            hms = [harmonic_mean(statistics.fmean(b[s] for b, _ in per), statistics.fmean(n[s] for _, n in per))
                   for s in sorted(common)]
            cells = {"Base": _fixed(b_mean, b_std, b_n), "New": _fixed(n_mean, n_std, n_n),
                     "HM": _fixed(harmonic_mean(b_mean, n_mean), statistics.pstdev(hms) if hms else None,
                                  len(common))}
        else:
            cells = {c: _cell([]) for c in ("Base", "New", "HM")}
        rows.append({"row": "Average", "method": method_name(mode), "mode": mode, "cells": cells})
    return rows


def fewshot_table(records: list[dict]) -> list[dict]:
    rows = []
    datasets = _order({r["dataset"] for r in records}, ELEVEN)
    modes = _order({r["mode"] for r in records}, DEFAULT_MODES)
    shots = sorted({r["shots"] for r in records})
    for dataset in datasets:
        for mode in modes:
            rs = [r for r in records if r["dataset"] == dataset and r["mode"] == mode]
            if rs:
                rows.append({"row": display(dataset), "method": method_name(mode), "mode": mode, "cells": {
                    f"{n} shots": _cell(list(_by_seed([r for r in rs if r["shots"] == n], _acc("all")).values()),
                                        _failed([r for r in rs if r["shots"] == n])) for n in shots}})
    for mode in modes:
        cells = {}
        for n in shots:
            per = [_by_seed([r for r in records if r["dataset"] == d and r["mode"] == mode and r["shots"] == n],
                            _acc("all")) for d in datasets]
            cells[f"{n} shots"] = _fixed(*_average(per)) if all(per) else _cell([])
        rows.append({"row": "Average", "method": method_name(mode), "mode": mode, "cells": cells})
    return rows


def transfer_table(records: list[dict]) -> list[dict]:
    rows = []
    modes = _order({r["mode"] for r in records}, DEFAULT_MODES)
    for source in sorted({r["dataset"] for r in records}):
        targets = _order({t for r in records if r["dataset"] == source for t in r["targets"]}, list(DISPLAY))
        for mode in modes:
            rs = [r for r in records if r["dataset"] == source and r["mode"] == mode]
            if not rs:
                continue
            cells = {f"Source: {display(source)}": _cell(list(_by_seed(rs, _acc("all")).values()), _failed(rs))}
            per = []
            for t in targets:
                values = _by_seed(rs, _target(t))
                failed = _failed(rs) or any("error" in r["targets"].get(t, {}) for r in rs)
                cells[display(t)] = _cell(list(values.values()), failed)
                per.append(values)
            cells["Average"] = _fixed(*_average(per)) if per and all(per) else _cell([])
            rows.append({"row": method_name(mode), "method": method_name(mode), "mode": mode, "cells": cells})
    return rows


TABLES = {"base2new": base2new_table, "fewshot": fewshot_table, "cross": transfer_table, "dg": transfer_table}


def _paper_row(row: str, method: str, values: dict, columns) -> dict:
    cells = {c: _fixed(values[k], None, 3) if values.get(k) is not None else _cell([]) for c, k in columns}
    return {"row": row, "method": f"{method} (paper)", "mode": None, "cells": cells}


def paper_rows(protocol: str, datasets=()) -> list[dict]:
    """The paper's published rows for ``protocol`` (``paper_numbers.json``): base-to-new's for each
    of ``datasets`` and the average; cross-dataset's and DG's source and targets' average."""
    numbers = paper_numbers().get(protocol) or {}
    if protocol == "base2new":
        columns = (("Base", "base"), ("New", "new"), ("HM", "hm"))
        rows = [_paper_row(display(d), method, values, columns)
                for d in datasets for method, values in (numbers.get("datasets") or {}).get(d, {}).items()]
        return rows + [_paper_row("Average", method, values, columns)
                       for method, values in (numbers.get("average") or {}).items()]
    source = f"Source: {display(PROTOCOLS[protocol].source)}" if protocol in PROTOCOLS else "Source"
    return [_paper_row(f"{method} (paper)", method, values, ((source, "source"), ("Average", "average")))
            for method, values in (numbers.get("methods") or {}).items()]


def with_paper_rows(protocol: str, rows: list[dict]) -> list[dict]:
    """``rows`` with the paper's beside them: each dataset's after ours for that dataset, the
    averages (or the transfer rows) at the end."""
    ours = dict.fromkeys(r["row"] for r in rows if r["row"] != "Average")
    keys = {display(d): d for d in ELEVEN}
    paper = paper_rows(protocol, [keys[r] for r in ours if r in keys])
    out = []
    for r, following in zip(rows, rows[1:] + [None]):
        out.append(r)
        if r["row"] != "Average" and (following is None or following["row"] != r["row"]):  # its last row
            out += [p for p in paper if p["row"] == r["row"]]
    return out + [p for p in paper if p["row"] not in ours]


# ------------------------------------------------------------------ writing
def _markdown_table(rows: list[dict], first: tuple[str, ...]) -> list[str]:
    columns = list(dict.fromkeys(c for r in rows for c in r["cells"]))
    lines = ["| " + " | ".join(list(first) + columns) + " |", "|" + " --- |" * (len(first) + len(columns))]
    for r in rows:
        lead = [f"**{r['row']}**" if r["row"] == "Average" else r["row"], r["method"]][:len(first)]
        lines.append("| " + " | ".join(lead + [fmt(r["cells"].get(c, _cell([]))) for c in columns]) + " |")
    return lines


def _num(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _result_text(r: dict) -> str:
    if r["status"] == "failed":
        return r["error"] or "failed"
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
        rows = TABLES[protocol](rs)
        if compare_paper:
            rows = with_paper_rows(protocol, rows)
        summary["protocols"][protocol] = {"title": PROTOCOLS[protocol].title, "settings": SETTINGS_SOURCES[protocol],
                                          "rows": rows, "runs": rs}
        summary["failed"] += [{"run": r["folder"], "error": r["error"]} for r in rs if r["status"] == "failed"]
        summary["incomplete"] += [r["folder"] for r in rs if r["status"] in ("incomplete", "targets failed")]
    if compare_paper:
        summary["paper"] = paper_numbers()
    return summary


def markdown(summary: dict, compare_paper: bool = False) -> str:
    lines = ["# Skip Tuning: the paper's evaluation", ""]
    for protocol, part in summary["protocols"].items():
        lines += [f"## {part['title']}", "", f"Settings: {part['settings']}. {QUARTER_RULE}.", ""]
        first = ("Method",) if PROTOCOLS[protocol].transfer else ("Dataset", "Method")
        lines += _markdown_table(part["rows"], first) + [""]
        if compare_paper and not paper_rows(protocol, ELEVEN):
            lines += [f"The paper's numbers for this protocol are not shipped "
                      f"({PAPER_FILE.name} has {', '.join(k for k in paper_numbers() if k != 'source')}).", ""]
    if compare_paper:
        lines += [f"Paper rows: {paper_numbers()['source']}", ""]
    lines += ["## Runs: train time and peak memory", "",
              "| Run | Status | Train s | Cache s | Peak train MB | Result |", "| --- | --- | --- | --- | --- | --- |"]
    for part in summary["protocols"].values():
        for r in part["runs"]:
            key = f"{r['protocol']}/{r['dataset']}/seed{r['seed']}/shots{r['shots']}/{r['mode']}"
            lines.append(f"| {key} | {r['status']} | {_num(r['train_s'])} | {_num(r['cache_s'])} | "
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
                                 "" if cell["std"] is None else f"{cell['std']:.4f}", cell["seeds"], cell["status"]])
    return buffer.getvalue()


def plot(summary: dict, out: Path) -> list[Path]:
    """One chart per protocol: HM per dataset (base-to-new), accuracy against shots (few-shot),
    accuracy per target (cross-dataset, DG). Without matplotlib: none, with a message."""
    from skipkernels.plots import _new_figure, _save, bar_chart
    drawn = []
    for protocol, part in summary["protocols"].items():
        path = Path(out) / f"{protocol}.png"
        rows = [r for r in part["rows"] if r["mode"] is not None]
        if protocol == "fewshot":
            figure = _new_figure(path, figsize=(5.5, 4), layout="constrained")
            if figure is None:
                return drawn
            ax = figure.subplots()
            for r in (r for r in rows if r["row"] == "Average"):
                points = [(int(c.split()[0]), v["mean"]) for c, v in r["cells"].items() if v["status"] == "ok"]
                if points:
                    ax.plot(*zip(*points), marker="o", label=r["method"])
            ax.set(xscale="log", xlabel="shots per class", ylabel="accuracy % (average over datasets)")
            ax.set_xticks(sorted({r["shots"] for r in part["runs"]}), labels=None)
            ax.get_xaxis().set_major_formatter("{x:g}")
            ax.legend(fontsize="small")
            figure.suptitle(part["title"], fontsize="medium")
            _save(figure, path)
        else:
            column = "HM" if protocol == "base2new" else None
            panels = []
            for mode in dict.fromkeys(r["mode"] for r in rows):
                values = {}
                for r in (r for r in rows if r["mode"] == mode):
                    for c, v in r["cells"].items():
                        if v["status"] == "ok" and (c == column or (column is None and not c.startswith("Source"))):
                            values[r["row"] if column else c] = v["mean"]
                if values:
                    panels.append((f"{method_name(mode)}: {column or 'accuracy'} %", values))
            if not panels or not bar_chart(panels, path, part["title"]):
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


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
