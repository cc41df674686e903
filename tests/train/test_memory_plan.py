"""``skipkernels plan``: the predicted peak training memory by kind, against the CPU allocator's
measurement of the same step (skipkernels.train.memory.CpuAllocatorPeak, the bench's probe).

To keep each test within seconds on two cores, the measured models have the true widths of
ViT-B/16 (768) and ViT-L/14 (1024) but few blocks: ViT-B/16 with 6 blocks per tower (ω = 2: four
suffix blocks, one more than the plan's own small probe model runs) and ViT-L/14 with 4 (ω = 1),
random weights, fp32, batch 2-4 and 10-20 classes. The plan is asked for the same depth
(``depth=``) and predicts from its own probe steps (one and two images, 4 and 8 classes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from skipkernels.cli import main
from skipkernels.memory_plan import KINDS, measure_memory, parse_memory, plan_memory

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15


def _agree(plan, measured) -> None:
    for kind in KINDS:
        predicted, seen = plan.kinds_mb[kind], measured[kind]
        if seen == 0:
            assert predicted == 0, (kind, predicted)
        else:
            assert abs(predicted - seen) <= TOLERANCE * seen, f"{kind}: predicted {predicted:.1f} MB, measured {seen:.1f}"


CASES = [  # model, mode, (image, text) blocks, omega, batch, classes
    ("ViT-B-16", "skip", (6, 6), 2, 4, 20),
    ("ViT-L-14", "skip", (4, 4), 1, 2, 10),
    ("ViT-B-16", "ft", (4, 4), None, 2, 10),
]


@pytest.mark.parametrize("model,mode,depth,omega,batch,classes", CASES)
def test_prediction_is_within_15_percent_of_the_cpu_measurement_per_kind(model, mode, depth, omega, batch,
                                                                         classes):
    plan = plan_memory(model, mode=mode, skip_layers=omega, batch_size=batch, num_classes=classes,
                       device_type="cpu", depth=depth, cache_images=0)
    measured = measure_memory(model, mode=mode, skip_layers=omega, batch_size=batch, num_classes=classes,
                              depth=depth)
    print(plan.table())
    print({k: round(measured[k], 2) for k in KINDS})
    assert plan.classes_per_step == measured["classes_per_step"]
    _agree(plan, measured)


def test_update_inside_backward_holds_no_gradient_buffer():
    """The Trainer's default on a CPU (and for eager and compiled steps on a GPU): no gradient is held
    between steps, so the prediction has none, and the measured peak agrees; with the update after
    backward every trainable tensor's gradient is held, predicted and measured alike."""
    common = dict(mode="skip", skip_layers=2, batch_size=4, num_classes=20, depth=(6, 6))
    inside = plan_memory("ViT-B-16", device_type="cpu", cache_images=0, **common)
    after = plan_memory("ViT-B-16", device_type="cpu", cache_images=0, update_in_backward="off", **common)
    assert inside.update_in_backward and not after.update_in_backward
    assert inside.kinds_mb["gradients"] == 0
    assert after.kinds_mb["gradients"] == pytest.approx(after.trainable_weights_mb)
    for plan, in_backward in ((inside, True), (after, False)):
        measured = measure_memory("ViT-B-16", update_in_backward=in_backward, **common)
        print(in_backward, plan.kinds_mb, {k: measured[k] for k in KINDS})
        _agree(plan, measured)
        total = sum(measured[k] for k in KINDS)
        assert abs(plan.total_mb - total) <= TOLERANCE * total
    assert inside.total_mb < after.total_mb - 0.9 * after.trainable_weights_mb


def test_the_gpu_default_step_follows_the_trainer():
    """On a GPU the Trainer's auto step is the CUDA graph where it can run (the update then stays
    after backward); past K images a batch CSkip's subset size is not fixed, the step is eager and
    the update runs inside backward."""
    graph = plan_memory("skipkernels-tiny", batch_size=4, num_classes=100)
    assert graph.step == "graph" and not graph.update_in_backward and graph.kinds_mb["gradients"] > 0
    eager = plan_memory("skipkernels-tiny", batch_size=64, num_classes=100)
    assert eager.step == "eager" and eager.update_in_backward and eager.kinds_mb["gradients"] == 0
    assert graph.amp == "bf16" and plan_memory("skipkernels-tiny", device_type="cpu").amp == "none"


def test_fits_largest_batch_and_smallest_omega():
    common = dict(num_classes=100, device_type="cpu", cache_images=0)
    limit_mb = plan_memory("skipkernels-tiny", batch_size=4, **common).total_mb + 0.5
    plan = plan_memory("skipkernels-tiny", batch_size=4, device_memory=limit_mb * 2**20, **common)
    assert plan.fits and plan.device_memory_mb == pytest.approx(limit_mb)
    assert plan.largest_batch >= 4
    assert plan_memory("skipkernels-tiny", batch_size=plan.largest_batch, **common).total_mb <= limit_mb
    assert plan_memory("skipkernels-tiny", batch_size=plan.largest_batch + 1, **common).total_mb > limit_mb
    omega = plan.smallest_skip_layers
    assert omega is not None and omega <= plan.skip_layers
    assert plan_memory("skipkernels-tiny", skip_layers=omega, **common).total_mb <= limit_mb
    if omega > 1:
        assert plan_memory("skipkernels-tiny", skip_layers=omega - 1, **common).total_mb > limit_mb
    tight = plan_memory("skipkernels-tiny", batch_size=4, device_memory="1MB", **common)
    assert tight.fits is False and tight.largest_batch is None and tight.smallest_skip_layers is None


def test_memory_sizes_parse():
    assert parse_memory("24GB") == 24e9 and parse_memory("80 GiB") == 80 * 2**30 and parse_memory("512MiB") == 2**29
    for bad in ("24XB", "GB", "-3GB", "0", ""):
        with pytest.raises(ValueError, match="bad memory size"):
            parse_memory(bad)


def test_cli_prints_the_kinds_the_verdict_and_json(capsys):
    assert main(["plan", "skipkernels-tiny", "--device-type", "cpu", "--gpu-memory", "24GB",
                 "--probe-cache", "none"]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert kind in out
    assert "fits in 22.4 GiB" in out and "largest batch that fits" in out
    assert main(["plan", "skipkernels-tiny", "--device-type", "cpu", "--gpu-memory", "1MB",
                 "--probe-cache", "none"]) == 0
    assert "does not fit in 0.0 GiB" in capsys.readouterr().out
    assert main(["plan", "skipkernels-tiny", "--mode", "ft", "--batch-size", "8", "--classes", "12",
                 "--gpu-memory", "40GB", "--json", "--probe-cache", "none"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["kinds_mb"]) == set(KINDS) and data["fits"] is True and data["mode"] == "ft"
    assert data["total_mb"] == pytest.approx(sum(data["kinds_mb"].values()))


@pytest.mark.parametrize("argv,message", [
    (["plan", "no-such-model"], "unknown model 'no-such-model'"),
    (["plan", "skipkernels-tiny", "--gpu-memory", "24XB"], "bad memory size '24XB'"),
    (["plan", "skipkernels-tiny", "--skip-layers", "9"], "omega (skip_layers) must be in [1, 4)"),
    (["plan", "skipkernels-tiny", "--mode", "ft", "--skip-layers", "2"], "mode ft caches nothing"),
    (["plan", "skipkernels-tiny", "--mode", "nope"], "unknown mode 'nope'"),
])
def test_cli_refuses_bad_input_in_one_line(argv, message, capsys):
    assert main(argv + ["--probe-cache", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skipkernels plan: error: ") and message in err and "\n" not in err


def test_probes_are_kept_in_the_cache_file(tmp_path):
    cache = tmp_path / "probes.json"
    first = plan_memory("skipkernels-tiny", device_type="cpu", probe_cache=cache)
    assert len(json.loads(cache.read_text())) == 1
    again = plan_memory("skipkernels-tiny", device_type="cpu", batch_size=4, probe_cache=cache)
    assert again.kinds_mb == first.kinds_mb


def test_vit_bigg_skip_tuning_at_batch_4():
    """The target: ViT-bigG-14 Skip Tuning at batch 4 within 22 GB (bf16 autocast on a GPU, 100
    classes, 16 shots in the LSkip image cache), asserted as the plan predicts it:
    - the eager or compiled step (the update inside backward, no gradient buffer) with the frozen
      prefix weights in host memory between caching passes: about 18.3 GiB (19.6e9 bytes), within
      the target; a caching pass, all weights back, stays below the steps' peak;
    - the same with the prefix weights kept on the device: 22.0 GiB, 23.6e9 bytes, above it;
    - the CUDA graph step (the update after backward): about 23.7 GiB, above it; so on that card
      the Trainer's auto step weighs the graph's gradients against the memory left and takes the
      compiled step, as the plan given the card's memory does; on 80 GB it takes the graph."""
    cache = ROOT / "bench" / "results" / "memory-probes.json"
    common = dict(mode="skip", batch_size=4, num_classes=100, device_memory="22GB", probe_cache=cache)
    graph = plan_memory("ViT-bigG-14", **common)
    eager = plan_memory("ViT-bigG-14", step="eager", **common)
    kept = plan_memory("ViT-bigG-14", step="eager", offload_prefix=False, **common)
    print(graph.table())
    print(eager.table())
    assert 9600 < kept.kinds_mb["weights"] < 9800  # 2.54 G fp32 parameters
    assert 3600 < eager.prefix_offloaded_mb < 4000  # 16 of 48 image and 16 of 32 text blocks, and the stems
    assert eager.kinds_mb["weights"] == pytest.approx(kept.kinds_mb["weights"] - eager.prefix_offloaded_mb)
    assert eager.update_in_backward and eager.kinds_mb["gradients"] == 0
    assert eager.fits and eager.total_mb * 2**20 < 22e9 and eager.caching_pass_mb < eager.steps_mb
    assert not kept.fits and kept.total_mb * 2**20 > 22e9
    assert graph.step == "compiled" and "auto on this card: graph is possible, but" in graph.step_reason
    assert graph.total_mb == eager.total_mb and graph.fits  # on a 22 GB card auto takes the compiled step
    unweighed = plan_memory("ViT-bigG-14", **{**common, "device_memory": None})
    assert unweighed.step == "graph" and not unweighed.update_in_backward
    assert unweighed.total_mb > eager.total_mb + 0.9 * unweighed.kinds_mb["gradients"]
    assert unweighed.total_mb * 2**20 > 22e9
    roomy = plan_memory("ViT-bigG-14", **{**common, "device_memory": "80GB"})
    assert roomy.step == "graph" and roomy.fits and not roomy.step_reason


def test_memory_doc_table_is_what_the_script_prints():
    doc = (ROOT / "docs" / "MEMORY.md").read_text()
    printed = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_table.py")], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout
    begin, end = "<!-- memory_table.py -->", "<!-- /memory_table.py -->"
    assert doc[doc.index(begin) + len(begin):doc.index(end)].strip() == printed.strip()


def test_readme_memory_table_is_what_the_script_prints():
    readme = (ROOT / "README.md").read_text()
    printed = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_table.py"), "--readme"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
    begin, end = "<!-- memory_table.py --readme -->", "<!-- /memory_table.py --readme -->"
    assert readme[readme.index(begin) + len(begin):readme.index(end)].strip() == printed.strip()


def test_bench_memory_entry_carries_the_prediction():
    """``skipkernels bench`` reports each mode's predicted kinds beside its measured memory."""
    import torch

    from skipkernels.bench import Scenario, measure_memory_child
    entry = measure_memory_child(Scenario.default("cpu", quick=True), "skip-kernels", torch.device("cpu"))
    assert set(entry["predicted_mb"]) == set(KINDS) and entry["peak_mb"] > 0
    assert entry["predicted_peak_mb"] == pytest.approx(sum(entry["predicted_mb"][k] for k in
                                                           ("gradients", "optimizer_state",
                                                            "activations_and_workspace")))
    paper = measure_memory_child(Scenario.default("cpu", quick=True), "paper", torch.device("cpu"))
    assert paper["predicted_mb"] is None and "not planned" in paper["predicted_note"]


def test_offloaded_prefix_bytes_per_tower_are_the_tuners(monkeypatch):
    """The plan's frozen prefix bytes, image and text apart (a caching pass brings back only the
    image tower's), are the ones the tuner moves (SkipTuner._set_up_prefix_offload, forced on the CPU)."""
    from skipkernels import SkipConfig, SkipTuner
    from skipkernels.memory_plan import _weight_counts
    from skipkernels.models import create_model
    set_up = SkipTuner._set_up_prefix_offload
    monkeypatch.setattr(SkipTuner, "_set_up_prefix_offload", lambda self, force=False: set_up(self, force=True))
    model, tokenizer = create_model("skipkernels-tiny", pretrained="none", seed=0)
    tuner = SkipTuner(model, ["a", "b", "c"], tokenizer, SkipConfig(mode="skip", skip_layers=2), seed=0)
    counts = _weight_counts("skipkernels-tiny", None, "skip", 2)
    assert counts["offloadable_text"] == tuner.prefix_offload["text"].nbytes > 0
    assert counts["offloadable"] == tuner.prefix_offload["text"].nbytes + tuner.prefix_offload["image"].nbytes
    tuner.restore_prefix()
