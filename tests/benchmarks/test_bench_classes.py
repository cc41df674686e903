"""``skipkernels bench --classes C1,C2,...``: training cost against the class count, and Skip
Tuning at ImageNet-21k's 21,841 classes on the tiny model."""
import argparse
import json

import pytest
import torch

from skipkernels.bench import class_counts
from skipkernels.cli import main


def test_class_counts_parse_one_or_a_list_and_refuse_zero_and_repeats():
    assert class_counts("100") == [100] and class_counts("100, 1000,21841") == [100, 1000, 21841]
    with pytest.raises(argparse.ArgumentTypeError, match="expected an integer >= 1, got 0"):
        class_counts("100,0")
    with pytest.raises(argparse.ArgumentTypeError, match="distinct"):
        class_counts("100,100")


def test_synthetic_class_names_are_distinct_and_give_prompts_of_one_token_length(tokenizer):
    """So the report's cost against C is not one of prompt length."""
    from skipkernels.data.names import class_names
    from skipkernels.bench_classes import IMAGENET_21K
    names = class_names(IMAGENET_21K)
    assert len(set(names)) == IMAGENET_21K and names[:12] == class_names(12)
    sample = names[::97] + names[-5:]
    tokens = tokenizer([f"a photo of a {name}." for name in sample])
    lengths = set((tokens.argmax(dim=-1) + 1).tolist())  # up to the end-of-text token, the largest id
    assert lengths == {11}  # start, "a photo of a", four words, ".", end


def test_the_class_scaling_report_writes_its_json_and_log_log_chart(tmp_path, capsys):
    assert main(["bench", "--quick", "--classes", "60,12", "--modes", "skip,ft", "--repeats", "2", "--warmup", "1",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "text cache MB" in printed and "saved: " in printed
    (report_path,) = tmp_path.glob("classes-cpu-skipkernels-tiny-b4-*.json")
    assert report_path.with_suffix(".png").stat().st_size > 10_000
    report = json.loads(report_path.read_text())
    assert report["class_counts"] == [12, 60] and report["modes"] == ["skip", "ft"]
    for count in ("12", "60"):
        point = report["points"][count]
        skip, ft = point["skip"], point["ft"]
        assert ft["k_prime"] == int(count) and skip["top_k"] < skip["k_prime"] < int(count)
        assert skip["text_prefix_cache"]["shape"][0] == int(count) and skip["text_prefix_cache"]["device"] == "cpu"
        assert ft["text_prefix_cache"] is None
        for mode in (skip, ft):
            assert 0 < mode["step_s"]["min"] <= mode["step_s"]["median"] and mode["setup_s"] > 0
            assert mode["memory"]["peak_mb"] > 0
        assert point["tokenize_s"] > 0
    growth = report["growth"]["skip"]["60"]
    assert growth["from_classes"] == 12 and growth["classes"] == 5
    assert growth["step_over_k_prime"] == pytest.approx(growth["step"] / growth["k_prime"])
    lengths = [report["points"][c]["skip"]["text_length"] for c in ("12", "60")]
    assert all(2 < n <= 77 for n in lengths)
    assert growth["text_tokens"] == pytest.approx(growth["k_prime"] * lengths[1] / lengths[0])


def test_the_class_scaling_report_refuses_a_step_variant_before_any_work(tmp_path, capsys):
    assert main(["bench", "--quick", "--classes", "12,60", "--modes", "skip,skip-graph", "--out", str(tmp_path)]) == 2
    assert "'skip-graph' is one of the bench's step variants" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_skip_tuning_trains_an_epoch_over_21841_classes_on_cpu():
    """ImageNet-21k's class count on the tiny model: the prefix cache holds every class, a step
    runs K′ of them (CSkip's subset, the same every step), and the weights train."""
    from skipkernels.data.names import class_names
    from skipkernels.bench_classes import IMAGENET_21K
    from skipkernels.models import create_model
    from skipkernels.patch import patch_clip
    from skipkernels.skip.tuner import SkipConfig, SkipTuner
    model, tokenizer = create_model("skipkernels-tiny", None, seed=0)
    tuner = SkipTuner(patch_clip(model), class_names(IMAGENET_21K), tokenizer, SkipConfig(skip_layers=2))
    cache = tuner.text_cache.tokens_at_block
    assert cache.shape[0] == IMAGENET_21K and cache.device.type == "cpu"
    assert tuner.skipper.top_k == 50
    optimizer = torch.optim.SGD(tuner.parameter_groups(1e-2), lr=1e-2, momentum=0.9)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 5000, 10000, 15000, 20000, 21839, 21840])
    inputs = tuner.image_prefix(images)
    before = {n: p.detach().clone() for n, p in tuner.trainable_named_parameters()}
    sizes = []
    for start in range(0, 8, 4):  # one epoch: two batches of four
        loss = tuner.loss(inputs[start:start + 4], labels[start:start + 4])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        sizes.append(tuner.last_selected.numel())
    # K' = top 50 + the labels + about λ-weighted tail of 21,791 ranks: in the thousand-odd range
    assert sizes[0] == sizes[1] and 1000 < sizes[0] < 2000
    changed = [n for n, p in tuner.trainable_named_parameters() if not torch.equal(p, before[n])]
    assert changed
