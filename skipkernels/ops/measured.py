"""Which Triton kernels beat their references, as measured on a GPU: ``backend="auto"`` asks here.

``measured_wins.json`` beside this file is generated from the pytest-benchmark JSON of
``bench/test_bench_triton.py`` run on a GPU (CUDA-event medians in ``extra_info``). Each
benchmark records its case with the op's own ``<op>_case`` function (``case_info``), the one
that dispatch looks up with, so the key is written once:

    python -m skipkernels.ops.measured bench/results/kernels-<stamp>.json [more.json ...]

Each entry is one measured case: device name, op, pass ("fwd" or "fwd_bwd"), compute dtype,
the op's feature dims, the row count and Triton's speedup over the reference. A call uses Triton
when the entry for its device/op/pass/dtype/dims with the nearest row count (log scale) shows a
speedup of at least MIN_SPEEDUP. No entry, no table or a CPU tensor: the reference.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import torch

from skipkernels.ops.policy import ALL_TRITON

TABLE = Path(__file__).with_name("measured_wins.json")
MIN_SPEEDUP = 1.05


@functools.lru_cache(maxsize=None)
def _entries(path: str) -> tuple:
    p = Path(path)
    return tuple(json.loads(p.read_text())["entries"]) if p.is_file() else ()


_ENTRY_KEYS = frozenset({"device", "op", "pass", "dtype", "dims", "rows", "speedup"})


def check_table(table: str | None) -> None:
    """ValueError unless ``table`` (a KernelPolicy's) is None (the packaged table), ``ALL_TRITON``
    or a readable table file as ``main`` writes it."""
    if table is None or table == ALL_TRITON:
        return
    path = Path(table)
    if not path.is_file():
        raise ValueError(f"kernel table {table!r}: no such file (a table written by `python -m "
                         f"skipkernels.ops.measured`, or {ALL_TRITON!r})")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        bad = next((e for e in entries if not isinstance(e, dict) or not _ENTRY_KEYS <= e.keys()), None)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"kernel table {table!r} is not a measured table ({{\"entries\": [...]}}): "
                         f"{type(err).__name__}: {err}") from None
    if bad is not None:
        raise ValueError(f"kernel table {table!r}: an entry lacks {sorted(_ENTRY_KEYS)}: {str(bad)[:200]}")


def decide(entries, device: str, op: str, pass_: str, dtype: str, dims, rows: int) -> bool:
    """Pure decision over measured entries (see the module docstring)."""
    dims = [d if isinstance(d, str) else int(d) for d in dims]
    candidates = [e for e in entries if e["device"] == device and e["op"] == op and e["pass"] == pass_
                  and e["dtype"] == dtype and e["dims"] == dims]
    if not candidates:
        return False
    nearest = min(candidates, key=lambda e: abs(math.log(max(1, e["rows"])) - math.log(max(1, rows))))
    return nearest["speedup"] >= MIN_SPEEDUP


def rows_of(x) -> int:
    """Rows of a (..., D) activation: what the table's row count counts for most ops."""
    return x.numel() // max(1, x.shape[-1])


def case_info(op: str, case) -> dict:
    """What a benchmark records (``extra_info["case"]``) for a call whose ``<op>_case`` is
    ``case`` = (dims, rows): the same key dispatch looks up, written by the same function."""
    dims, rows = case
    return {"op": op, "dims": [d if isinstance(d, str) else int(d) for d in dims], "rows": int(rows)}


def compute_dtype(x: torch.Tensor) -> str:
    if torch.is_autocast_enabled(x.device.type):
        return str(torch.get_autocast_dtype(x.device.type))
    return str(x.dtype)


# Called when main() rewrites the table: ops.op forgets the decisions bound from the old one.
ON_REWRITE: list = []


def entries(table: str | None) -> tuple:
    """The entries of a KernelPolicy's table (None: the packaged one; ALL_TRITON: none needed)."""
    return () if table == ALL_TRITON else _entries(str(TABLE) if table is None else table)


def prefers_triton(op: str, x: torch.Tensor, dims, rows: int, tensors=(), dtype: str | None = None,
                   table: str | None = None, backward: bool | None = None) -> bool:
    """Whether ``table`` (a KernelPolicy's: None for the packaged TABLE, a path, or ALL_TRITON)
    shows op's Triton kernel winning for this call. ``dtype``: the compute dtype to look up; by
    default x's, or the autocast dtype. ``backward``: whether the call is differentiated; by
    default, whether grad is on and x or one of ``tensors`` requires it. The op layer asks once
    per case and remembers the answer in the op's bound callable (ops/op.py)."""
    if not x.is_cuda:
        return False
    if table == ALL_TRITON:
        return True
    if backward is None:
        backward = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                   for t in (x, *tensors))
    found = entries(table)
    return bool(found) and decide(found, _device_name(x.device.index), op, "fwd_bwd" if backward else "fwd",
                                  dtype or compute_dtype(x), tuple(dims), rows)


@functools.lru_cache(maxsize=None)
def _device_name(index) -> str:
    return torch.cuda.get_device_name(index)


def build_entries(reports: list[dict]) -> list[dict]:
    """Pair each Triton case with the reference ('torch') case of the same parameters."""
    timed = {}
    for report in reports:
        for bench in report["benchmarks"]:
            info, params = bench["extra_info"], bench.get("params") or {}
            case = info.get("case")
            if case is None or "median_ms" not in info or info.get("device", "cpu") == "cpu":
                continue
            op, dims, rows = case["op"], case["dims"], case["rows"]
            impl = params.get("impl", params.get("backend"))  # the PET benchmark says "backend"
            rest = tuple(sorted((k, str(v)) for k, v in params.items() if k not in ("impl", "backend")))
            key = (info["device"], op, info["mode"], info["dtype"], json.dumps(dims), rows, rest)
            timed.setdefault(key, {})[impl] = info["median_ms"]
    entries = []
    for (device, op, pass_, dtype, dims, rows, _), impls in sorted(timed.items()):
        if "torch" in impls and "triton" in impls:
            entries.append({"device": device, "op": op, "pass": pass_, "dtype": dtype, "dims": json.loads(dims),
                            "rows": rows, "speedup": impls["torch"] / impls["triton"]})
    return entries


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print("usage: python -m skipkernels.ops.measured KERNELS.json [...]", file=sys.stderr)
        return 2
    new = build_entries([json.loads(Path(p).read_text()) for p in paths])
    old = [e for e in entries(None) if e["device"] not in {n["device"] for n in new}]
    TABLE.write_text(json.dumps({"entries": old + new}, indent=1) + "\n")
    _entries.cache_clear()  # this process decides from the new table from now on
    for forget in ON_REWRITE:
        forget()
    wins = sum(e["speedup"] >= MIN_SPEEDUP for e in new)
    print(f"{TABLE}: {len(new)} measured cases, Triton wins {wins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
