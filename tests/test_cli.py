import json
import subprocess
import sys

import pytest

from skipkernels.cli import main


def test_info_command(capsys):
    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert "skipkernels._C" in out and '"compiled_ops"' in out


@pytest.mark.slow
def test_demo_prints_the_comparison_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SKIPKERNELS_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--epochs", "2", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mode" in out and "base %" in out and "HM" in out
    assert "\nzero-shot " in out and "\nft " in out and "\ncoop " in out and "\nskip " in out
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["mode"] for r in saved["rows"]] == ["ft", "coop", "skip"]
    assert saved["rows"][2]["trainable_params"] < saved["rows"][0]["trainable_params"]
    assert (tmp_path / "demo" / "demo.png").is_file() and (tmp_path / "demo" / "skip" / "training.png").is_file()
    assert saved["rows"][0]["zero_shot_accuracy"]["hm"] > 0


# A plain CLIP, and a SigLIP-like model whose own tokenizer would come from the Hugging Face hub:
# --tokenizer gives it open_clip's BPE tokenizer instead (no network).
@pytest.mark.parametrize("model,extra", [("skipkernels-tiny", []),
                                         ("skipkernels-tiny-siglip", ["--tokenizer", "ViT-B-16"])])
def test_finetune_then_eval_round_trip(model, extra, synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--data", str(synthetic_root), "--dataset", "synthetic", "--model", model,
            "--mode", "skip", "--skip-layers", "2", "--epochs", "1", "--shots", "4", "--batch-size", "4",
            "--lr", "0.003", "--out", str(out), "--no-progress"] + extra
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] and "hm" in results["accuracy"]
    assert set(results["exact_savings"]) == {"text truncation", "image last-block pruning", "text last-block pruning"}
    capsys.readouterr()
    assert main(["eval", "--data", str(synthetic_root), "--dataset", "synthetic", "--model", model,
                 "--checkpoint", str(out / "model.pt"), "--no-progress"] + extra) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["base"] == pytest.approx(results["accuracy"]["base"])
    assert evaluated["new"] == pytest.approx(results["accuracy"]["new"])


@pytest.mark.parametrize("extra,message", [
    (["--data", "/nonexistent/folder", "--dataset", "dtd"], "dataset folder not found"),
    (["--skip-layers", "9"], "skip_layers must be in"),
    (["--top-ratio", "0"], "top_ratio must be > 0"),
    (["--lam", "-1"], "lam must be > 0"),
    (["--batch-size", "32"], "larger than the 16 shots"),
    (["--pretrained", "/no/such/weights.pt"], "pretrained checkpoint not found"),
])
def test_bad_arguments_exit_cleanly_with_a_message(extra, message, tmp_path, capsys, synthetic_root):
    args = ["finetune", "--data", str(synthetic_root), "--dataset", "synthetic", "--model", "skipkernels-tiny",
            "--epochs", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "skipkernels", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "finetune" in proc.stdout and "demo" in proc.stdout


def test_quickstart_example_runs(tmp_path):
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "python" / "quickstart.py"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SKIPKERNELS_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1: loss" in proc.stdout
