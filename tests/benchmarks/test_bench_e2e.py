"""``skipkernels bench`` runs end to end on a CPU and writes its JSON and chart."""
import json

import pytest

from skipkernels.cli import main


@pytest.mark.slow
def test_bench_quick_writes_table_json_and_chart(tmp_path, capsys):
    assert main(["bench", "--quick", "--modes", "ft,skip-ref,skip-kernels,skip-triton,skip-graph,skip-triton-graph,lskip-lora", "--repeats", "2",
                 "--warmup", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vs skip-ref" in out and "skip-graph" in out
    reports = list(tmp_path.glob("e2e-cpu-*.json"))
    assert len(reports) == 1 and len(list(tmp_path.glob("e2e-cpu-*.png"))) == 1
    report = json.loads(reports[0].read_text())
    results = report["results"]
    assert results["skip-graph"] == {"skipped": "CUDA graphs need a GPU"}
    assert results["skip-triton"] == {"skipped": "Triton kernels need a GPU"}
    assert results["skip-triton-graph"] == {"skipped": "CUDA graphs need a GPU"}
    for mode in ("ft", "skip-ref", "skip-kernels", "lskip-lora"):
        step = results[mode]["step_s"]
        assert 0 < step["min"] <= step["median"] <= step["max"] and step["n"] == 2
        assert results[mode]["epoch_s"] > 0 and "peak_mb" in results[mode]["memory"]
        assert results[mode]["memory"]["kind"].startswith("cpu allocator peak")  # never an RSS delta
    # FT keeps gradients and momentum for every weight: above Skip Tuning's suffix-only state
    assert results["ft"]["memory"]["peak_mb"] > results["skip-ref"]["memory"]["peak_mb"]
    assert results["skip-ref"]["cache_mb"] > 0 and results["ft"]["cache_mb"] == 0
    # what ran: the reference modes on PyTorch's ops, ours under the measured table
    assert results["skip-ref"]["kernel_policy"] == {"backend": "torch", "table": None}
    assert results["skip-kernels"]["kernel_policy"]["backend"] == "auto"
    # and how each step ran: the Trainer's choices for ours, on a CPU in fp32: no copies to keep
    settings = results["skip-kernels"]["step"]
    assert settings["kind"] == "eager" and settings["update"].startswith("in backward")
    assert settings["working_copies"].startswith("off (no autocast")
    env = report["environment"]
    assert {"device", "torch", "git_commit", "date"} <= set(env)


def test_bench_rejects_unknown_modes(capsys):
    assert main(["bench", "--quick", "--modes", "nope", "--no-memory", "--no-epoch"]) == 2
    assert "unknown bench modes ['nope']" in capsys.readouterr().err
