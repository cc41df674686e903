"""``skipkernels bench --inference``: image -> logits latency per method, with its JSON and chart,
and the methods' classifiers computing what their tuners do."""
import json

import pytest
import torch

from skipkernels.data.names import class_names
from skipkernels.bench_inference import INFERENCE_METHODS, method_classifier
from skipkernels.cli import main
from skipkernels.models import create_model
from skipkernels.patch import patch_clip


@pytest.mark.parametrize("method", ["coop", "adapter", "lora", "lora-merged"])
def test_each_methods_classifier_gives_its_tuners_logits(method):
    model, tokenizer = create_model("skipkernels-tiny", None, seed=0)
    base, names = patch_clip(model), class_names(7)
    module, tuner = method_classifier(method, base, tokenizer, names, 2)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tuner.model.logit_scale.exp() * tuner.encode_images(images, normalize=True) @ \
            tuner.encode_classes(names, normalize=True).T
        logits = module(images)
    assert logits.shape == (3, 7) and (logits - expected).abs().max() < 1e-4
    assert (tuner.pet is not None and tuner.pet.active) == (method in ("adapter", "lora"))


def test_inference_bench_writes_every_method_json_and_chart(tmp_path, capsys):
    assert main(["bench", "--quick", "--inference", "--no-compile", "--repeats", "2", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "vs zero-shot (eager b1)" in printed
    (report_path,) = tmp_path.glob("inference-cpu-skipkernels-tiny-c12-*.json")
    assert report_path.with_suffix(".png").stat().st_size > 10_000
    report = json.loads(report_path.read_text())
    assert report["methods"] == list(INFERENCE_METHODS) and report["batches"] == [1, 64]
    assert report["paper_reference"] == {"skip_below_pet": 0.29}
    results = report["results"]
    for method in INFERENCE_METHODS:
        for batch in ("1", "64"):
            step = results[method]["eager"][batch]
            assert 0 < step["min"] <= step["median"] <= step["max"] and step["n"] == 2
        assert "compiled" not in results[method]
    # the plain CLIPs have the same parameters; unmerged LoRA and the adapter carry more
    plain = results["zero-shot"]["parameters"]
    assert results["skip"]["parameters"] == results["ft"]["parameters"] == results["lora-merged"]["parameters"] == plain
    assert results["lora"]["parameters"] > plain and results["adapter"]["parameters"] > plain
    onnx = results["skip"]["onnxruntime"]
    if isinstance(onnx, str):
        assert onnx.startswith("not measured:")
    else:
        assert onnx["64"]["median"] > 0


@pytest.mark.slow
def test_inference_bench_compiles_and_refuses_unknown_methods(tmp_path, capfd, caplog):
    assert main(["bench", "--quick", "--inference", "--modes", "skip,paper", "--out", str(tmp_path)]) == 2
    assert "unknown: ['paper']" in capfd.readouterr().err
    assert main(["bench", "--quick", "--inference", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    (report_path,) = tmp_path.glob("inference-*.json")
    results = json.loads(report_path.read_text())["results"]
    for method in INFERENCE_METHODS:
        assert results[method]["compile_s"] > 0 and results[method]["compiled"]["64"]["median"] > 0
    # every method at both batch sizes compiled: none fell back to eager past dynamo's limit
    said = capfd.readouterr().err + caplog.text
    assert "recompile_limit" not in said
