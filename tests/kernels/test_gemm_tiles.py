"""The GEMM tile choice is bounded: how many variants and benchmarks a ViT-B/16 Skip Tuning run
requests, counted from its shapes alone (no GPU), and a tuned choice that persists."""
import json

import pytest
import torch

from skipkernels.triton import gemm_tiles
from skipkernels.triton.gemm_tiles import Tile, TileTable, plan


def vit_b16_gemms(batch: int, classes: int, text_len: int, omega: int = 6, dtype=torch.bfloat16):
    """Forward GEMM launches (kernel, variant, M, N, K) of one all-Triton ViT-B/16 step with LSkip
    at ``omega`` and ``classes`` selected prompts of ``text_len`` tokens, as ``block_forward``
    composes a block: LN→QKV (layer_norm_linear), out-proj + residual (linear), LN→fc1 + GELU
    (layer_norm_linear), fc2 + residual (linear); the last block of each tower is pruned to its
    pooled row after the QKV projection. Width 768 / 12 blocks (image), 512 / 12 (text)."""
    out = []
    for tokens, width, rows_per_item in ((197, 768, batch), (text_len, 512, classes)):
        rows = rows_per_item * tokens
        for block in range(omega, 12):
            last = block == 11
            tail = rows_per_item if last else rows  # pruned: only the pooled rows after QKV
            out += [("layer_norm_linear", "qkv", rows, 3 * width, width),
                    ("linear", "out", tail, width, width),
                    ("layer_norm_linear", "fc1", tail, 4 * width, width),
                    ("linear", "fc2", tail, width, 4 * width)]
    return [(kernel, variant, m, n, k, dtype) for kernel, variant, m, n, k in out]


def prefix_gemms(rows_per_item: int, tokens: int, width: int, dtype=torch.bfloat16, omega: int = 6):
    """The frozen prefix (caching pass, no grad: other constexpr variants)."""
    return [(kernel, f"{variant}-nograd", rows_per_item * tokens, n, k, dtype)
            for kernel, variant, n, k in (("layer_norm_linear", "qkv", 3 * width, width),
                                          ("linear", "out", width, width),
                                          ("layer_norm_linear", "fc1", 4 * width, width),
                                          ("linear", "fc2", width, 4 * width))] * omega


def requests(launches, limit=232448):
    """(tuned keys, benchmarks, compiled variants) a process would request for these launches."""
    keys, compiled = {}, set()
    for kernel, variant, m, n, k, dtype in launches:
        tile, tuned = plan(kernel, m, n, k, dtype, limit)
        if tile is not None:
            compiled.add((kernel, variant, tile))
            continue
        key, candidates = tuned
        if key not in keys:  # the first launch of a key times (so compiles) every candidate
            keys[key] = candidates
            compiled.update((kernel, variant, t) for t in candidates)
        else:  # later variants of the key compile the chosen tile only (at most one per variant)
            compiled.add((kernel, variant, "chosen"))
    return keys, sum(len(c) for c in keys.values()), compiled


def test_a_vit_b16_run_tunes_a_bounded_number_of_keys():
    setup = prefix_gemms(500, 24, 512) + prefix_gemms(256, 197, 768)  # text prefix, an image epoch
    first = vit_b16_gemms(batch=4, classes=60, text_len=24)
    keys, benchmarks, compiled = requests(setup + first)
    assert len(keys) <= 8  # 4 GEMM shapes per tower
    assert benchmarks <= 16
    assert len(compiled) <= 40
    # Training then varies text length, subset size and batch: nothing new is timed, and no
    # new variant compiles (M is not specialised: do_not_specialize).
    later = [launch for t in range(8, 80, 8) for kp in (40, 55, 70) for b in (1, 4, 32)
             for launch in vit_b16_gemms(batch=b, classes=kp, text_len=t)]
    keys2, benchmarks2, compiled2 = requests(setup + first + later)
    assert keys2.keys() == keys.keys() and benchmarks2 == benchmarks
    assert len(compiled2 - compiled) <= 4  # at most the small-M heuristic tiles of tiny batches


def test_fp32_and_small_rows_are_never_timed():
    for m in (1, 16, 200, 256, 257, 5000):
        tile, tuned = plan("linear", m, 768, 768, torch.float32)
        assert tile == gemm_tiles.FP32_TILE and tuned is None
    for m in (1, 4, 33, 256):
        tile, tuned = plan("layer_norm_linear", m, 2304, 768, torch.bfloat16)
        assert tuned is None and tile.block_m >= min(m, 16)
    _, (key_a, _) = plan("linear", 257, 768, 768, torch.bfloat16)
    _, (key_b, _) = plan("linear", 50432, 768, 768, torch.float16)
    assert key_a == key_b  # one tuned entry for every large M, in either half dtype


def test_candidates_that_cannot_fit_shared_memory_are_dropped():
    _, (_, all_fit) = plan("layer_norm_linear", 4096, 2304, 768, torch.bfloat16, 232448)
    limit = min(t.shared_bytes(2, 2) for t in all_fit)
    _, (_, fitting) = plan("layer_norm_linear", 4096, 2304, 768, torch.bfloat16, limit)
    assert fitting and all(t.shared_bytes(2, 2) <= limit for t in fitting) and len(fitting) < len(all_fit)
    # fp32 A operand (autocast LN input) doubles A's stages
    _, (_, with_fp32_a) = plan("layer_norm_linear", 4096, 2304, 768, torch.bfloat16, 166912, a_bytes=4)
    assert all(t.shared_bytes(4, 2) <= 166912 for t in with_fp32_a)
    tile, tuned = plan("linear", 4096, 768, 768, torch.bfloat16, 1024)
    assert tuned is None and tile == gemm_tiles.SMALL_TILES[-1][1]


def test_a_tuned_tile_is_measured_once_and_persists(tmp_path, monkeypatch):
    monkeypatch.setattr(TileTable, "_scope", staticmethod(lambda: "test-device|triton x"))
    timings = {Tile(128, 128, 64, 8, 3): 2.0, Tile(64, 128, 64, 4, 4): 1.0}
    timed = []

    def fake_measure(self, candidates, run):
        self.benchmarks += len(candidates)
        timed.extend(candidates)
        return min(candidates, key=timings.get)

    monkeypatch.setattr(TileTable, "_measure", fake_measure)
    path = tmp_path / "gemm_tiles.json"
    key, candidates = plan("linear", 1000, 768, 768, torch.bfloat16)[1]
    first = TileTable(path)
    assert first.choose(key, candidates, run=None) == Tile(64, 128, 64, 4, 4)
    assert first.choose(key, candidates, run=None) == Tile(64, 128, 64, 4, 4)
    assert first.benchmarks == 2 and len(timed) == 2
    assert "test-device|triton x" in json.loads(path.read_text())
    second = TileTable(path)  # another process: reads the file, times nothing
    assert second.choose(key, candidates, run=None) == Tile(64, 128, 64, 4, 4)
    assert second.benchmarks == 0 and len(timed) == 2


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown GEMM kernel"):
        plan("conv", 10, 10, 10, torch.bfloat16)
