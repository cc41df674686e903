"""``skipkernels bench`` runs the paper-style baseline and takes every ratio against it."""
import json

from skipkernels.cli import main


def test_bench_paper_mode_is_the_ratio_base(tmp_path, capsys):
    assert main(["bench", "--quick", "--modes", "paper,skip-ref,skip-compile-graphs", "--repeats", "2",
                 "--warmup", "1", "--no-memory", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vs paper" in out
    report = json.loads(next(tmp_path.glob("e2e-cpu-*.json")).read_text())
    results = report["results"]
    assert results["skip-compile-graphs"] == {"skipped": "CUDA graphs need a GPU"}
    for mode in ("paper", "skip-ref"):
        assert results[mode]["step_s"]["n"] == 2 and results[mode]["epoch_s"] > 0
        assert results[mode]["cache_mb"] > 0  # both cache the image prefix each epoch


def test_memory_breakdown_counts_weights_gradients_and_optimizer_state():
    import torch

    from skipkernels import bench
    from skipkernels.models import create_model
    scenario = bench.Scenario.default("cpu", quick=True)
    model, tokenizer = create_model(scenario.model, None, device=torch.device("cpu"), seed=0)
    runner = bench.ModeRunner("paper", model, tokenizer, scenario, torch.device("cpu"), None)
    images = bench._images(scenario, runner.tuner.model, 4, torch.device("cpu"), 0)
    runner.step(runner.inputs_for(images), torch.tensor([1, 1, 1, 1]))
    params = list(runner.tuner.model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    everything = sum(p.numel() * p.element_size() for p in params)
    mb = 2**20
    parts = bench.memory_breakdown(runner, before_bytes=everything + 2 * trainable + 5 * mb,
                                   peak_bytes=everything + 2 * trainable + 12 * mb, device_type="cpu")
    assert parts["weights"] * mb >= everything
    assert abs(parts["gradients"] * mb - trainable) < 1 and abs(parts["optimizer_state"] * mb - trainable) < 1
    assert abs(parts["activations_and_workspace"] - 7) < 1e-9
    assert 0 < parts["caches_and_inputs"] <= 5


def test_bench_runs_a_siglip_model_and_says_why_paper_does_not(tmp_path, capsys):
    assert main(["bench", "--quick", "--model", "skipkernels-tiny-siglip", "--tokenizer", "ViT-B-16",
                 "--modes", "paper,skip-ref", "--repeats", "1", "--warmup", "0", "--no-memory", "--no-epoch",
                 "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("e2e-cpu-*.json")).read_text())
    assert report["scenario"]["tokenizer"] == "ViT-B-16"
    assert "open_clip CLIP models" in report["results"]["paper"]["skipped"]
    assert report["results"]["skip-ref"]["step_s"]["n"] == 1
