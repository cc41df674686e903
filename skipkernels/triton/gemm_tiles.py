"""Tile choice of the GEMM kernels (``linear``, ``layer_norm_linear``): bounded and persistent.

``triton.autotune`` keyed on the exact ``M, N, K`` compiled and benchmarked 6-8 configurations
for every distinct row count, fp32 included, so a Skip Tuning run re-tuned whenever the
truncated text length or the class subset changed M = K'·T, and the first all-Triton step spent
minutes in the compiler. Here:

- the key is only what changes the best tile: kernel, N, K, the GEMM dtype and a row bucket;
- rows ≤ ``SMALL_M`` (the pruned last block, small batches) take a tile by heuristic, never a
  benchmark; every larger M shares one tuned entry per (kernel, N, K, dtype), so a changing text
  length, subset size or batch never triggers a new benchmark once that entry exists;
- fp32 GEMMs take one small tile (fp32 operands double the shared memory of a stage and get
  no tensor-core speed-up worth a search);
- candidates whose pipeline cannot fit the device's shared memory are dropped before compiling;
- a tuned choice is written to ``$SKIPKERNELS_CACHE/gemm_tiles.json`` (per device name and
  Triton version) and read back by later processes: with a warm Triton cache, set-up compiles
  and benchmarks nothing.

``plan`` is pure (shapes in, tile or candidates out), so a CPU test can count how many variants
and benchmarks a ViT-B/16 step requests without a GPU.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SMALL_M = 256  # rows up to here: heuristic tile, no benchmark


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int

    def launch_meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=8,
                    num_warps=self.warps, num_stages=self.stages)

    def shared_bytes(self, a_bytes: int, b_bytes: int) -> int:
        """Shared memory of the software pipeline: one A and one B tile per stage."""
        return self.stages * (self.block_m * self.block_k * a_bytes + self.block_k * self.block_n * b_bytes)


# Candidates benchmarked once per (kernel, N, K, dtype) for M > SMALL_M in half precision. Two
# each: every candidate is a compile (~1 s) per constexpr variant the first time it is timed.
CANDIDATES = {
    "linear": (Tile(128, 128, 64, 8, 3), Tile(64, 128, 64, 4, 4)),
    # The LN statistics pass is a fixed cost per program: wide N tiles amortise it best.
    "layer_norm_linear": (Tile(128, 128, 64, 8, 3), Tile(128, 256, 64, 8, 3)),
}
# Heuristic tiles by row bucket (half precision); the first bucket whose bound covers M.
# Few buckets: each is a compile per variant, and the pruned last block's rows (the batch, or K')
# move between them as the batch or subset changes. Such GEMMs read all of W for a few rows, so a
# tile taller than M costs little.
SMALL_TILES = ((64, Tile(32, 128, 64, 4, 4)), (SMALL_M, Tile(64, 64, 64, 4, 4)))
FP32_TILE = Tile(32, 64, 32, 4, 2)
KERNELS = tuple(CANDIDATES)


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def plan(kernel: str, m: int, n: int, k: int, dtype: torch.dtype, shared_limit: int | None = None,
         a_bytes: int | None = None):
    """(tile, None) when the tile is decided without measuring, else (None, (key, candidates))."""
    if kernel not in CANDIDATES:
        raise ValueError(f"unknown GEMM kernel {kernel!r}; expected one of {KERNELS}")
    cls = dtype_class(dtype)
    if cls == "fp32":
        return FP32_TILE, None
    if m <= SMALL_M:
        return next(tile for bound, tile in SMALL_TILES if m <= bound), None
    b_bytes = 2
    a_bytes = b_bytes if a_bytes is None else a_bytes
    candidates = tuple(t for t in CANDIDATES[kernel]
                       if shared_limit is None or t.shared_bytes(a_bytes, b_bytes) <= shared_limit)
    if not candidates:  # nothing fits: the smallest heuristic tile always does
        return SMALL_TILES[-1][1], None
    key = (kernel, int(n), int(k), cls, "large")
    return None, (key, candidates)


def _cache_file() -> Path:
    root = os.environ.get("SKIPKERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "skipkernels")
    return Path(root) / "gemm_tiles.json"


class TileTable:
    """Tuned tiles of this process, backed by the JSON file shared across processes."""

    def __init__(self, path: Path | None = None):
        self.path = _cache_file() if path is None else Path(path)
        self._lock = threading.Lock()
        self._memo: dict[tuple, Tile] = {}
        self._loaded: dict | None = None
        self.benchmarks = 0  # candidates timed by this process (tests and bench/gpu_setup_profile.py read it)

    @staticmethod
    def _scope() -> str:
        import triton
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        return f"{name}|triton {triton.__version__}"

    def _file_entries(self) -> dict:
        if self._loaded is None:
            try:
                self._loaded = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._loaded = {}
        return self._loaded.get(self._scope(), {})

    def _save(self, key: tuple, tile: Tile) -> None:
        data = dict(self._loaded or {})
        scope = dict(data.get(self._scope(), {}))
        scope["|".join(map(str, key))] = asdict(tile)
        data[self._scope()] = scope
        self._loaded = data
        try:  # atomic: a concurrent process sees the old file or the new one
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gemm_tiles.")
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache only costs the next process a benchmark

    def choose(self, key: tuple, candidates, run) -> Tile:
        """The tuned tile for ``key``: memoised, else from the file, else measured by timing
        ``run(tile)`` (one launch with that tile) for each candidate, once."""
        tile = self._memo.get(key)
        if tile is not None:
            return tile
        with self._lock:
            tile = self._memo.get(key)
            if tile is None:
                stored = self._file_entries().get("|".join(map(str, key)))
                if stored is not None:
                    tile = Tile(**stored)
                else:
                    tile = self._measure(candidates, run)
                    self._save(key, tile)
                self._memo[key] = tile
        return tile

    def _measure(self, candidates, run) -> Tile:
        from triton.testing import do_bench
        best, best_ms = candidates[0], float("inf")
        for tile in candidates:
            self.benchmarks += 1
            ms = do_bench(lambda: run(tile), warmup=5, rep=20)
            if ms < best_ms:
                best, best_ms = tile, ms
        return best


_table: TileTable | None = None


def table() -> TileTable:
    global _table
    if _table is None:
        _table = TileTable()
    return _table


def shared_memory_limit(device) -> int | None:
    try:
        import triton
        props = triton.runtime.driver.active.utils.get_device_properties(torch.device(device).index or 0)
        return int(props["max_shared_mem"])
    except Exception:  # noqa: BLE001 - an unknown limit only means no pruning
        return None


_limits: dict = {}


def tile_for(kernel: str, m: int, n: int, k: int, dtype: torch.dtype, device, a_dtype: torch.dtype, run) -> Tile:
    """The tile a GPU launch of ``kernel`` uses: heuristic, or tuned once per key (see ``plan``)."""
    if device not in _limits:
        _limits[device] = shared_memory_limit(device)
    tile, tuned = plan(kernel, m, n, k, dtype, _limits[device], a_dtype.itemsize)
    if tile is not None:
        return tile
    key, candidates = tuned
    return table().choose(key, candidates, run)
