"""Every mode resolves once into a plan (what is cached, which classes run, what trains, the PET
method, omega as skip_layers), and SkipTuner does what its plan says. The PET methods and the
activation names are each listed once."""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import tiny_clip
from skipkernels import SkipConfig, SkipTuner
from skipkernels.pet import METHODS, LoRAConfig, VLPETConfig, trainable_modules_for_mode
from skipkernels.skip.modes import MODES, ModePlan, mode_plan

PACKAGE = Path(__file__).resolve().parents[2] / "skipkernels"
CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "cat", "dog"]
OMEGA = 1

# mode: (caches the prefix, a class subset per step, what trains, PET method)
EXPECTED = {
    "skip": (True, True, "suffix", None),
    "lskip": (True, False, "suffix", None),
    "cskip": (False, True, "all", None),
    "ft": (False, False, "all", None),
    "coop": (False, False, "prompt", None),
    **{method: (False, False, "pet", method) for method in METHODS},
    **{f"lskip-{method}": (True, False, "pet", method) for method in METHODS},
}


def test_the_table_names_every_mode():
    assert sorted(EXPECTED) == sorted(MODES) and len(MODES) == len(set(MODES))


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_resolves_to_its_plan(mode):
    cached, subset, trains, method = EXPECTED[mode]
    plan = mode_plan(mode, 3)
    assert plan == ModePlan(mode=mode, caches_prefix=cached, class_subset=subset, trains=trains,
                            pet_method=method, skip_layers=3 if cached else 0)
    config = SkipConfig(mode=mode, skip_layers=3)
    assert config.plan == plan
    assert config.pet_method == method  # the plan's answer


def test_a_plan_is_frozen_and_unknown_modes_are_refused():
    plan = mode_plan("skip", 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.skip_layers = 3
    with pytest.raises(ValueError, match="mode must be one of"):
        mode_plan("lskip-prefix", 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        SkipConfig(mode="vlpet")


def _expected_trainable(model, plan):
    names = {n for n, _ in model.named_parameters()}
    if plan.trains == "all":
        return names - {"logit_scale"}
    assert plan.trains == "suffix"
    blocks = {n for n in names for prefix in ("visual.transformer.resblocks.", "transformer.resblocks.")
              if n.startswith(prefix) and int(n[len(prefix):].split(".")[0]) >= plan.skip_layers}
    heads = {n for n in names if n.startswith(("visual.ln_post.", "ln_final."))} | {"visual.proj", "text_projection"}
    return blocks | heads


@pytest.mark.parametrize("mode", MODES)
def test_the_tuner_caches_runs_and_trains_what_its_plan_says(mode, tokenizer):
    torch.manual_seed(0)
    model = tiny_clip(layers=3)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=OMEGA, top_ratio=0.25))
    plan = tuner.plan
    assert plan == mode_plan(mode, OMEGA)
    assert tuner.skip_layers == plan.skip_layers

    # what is cached
    assert (tuner.text_cache is not None) == plan.caches_prefix
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 5])
    inputs = tuner.image_prefix(images) if plan.caches_prefix else images
    if plan.caches_prefix:
        assert inputs.dim() == 3  # tokens entering block skip_layers

    # which classes run
    assert (tuner.skipper is not None) == plan.class_subset
    loss = tuner.loss(inputs, labels)
    if not plan.class_subset:
        assert tuner.last_selected.tolist() == list(range(len(CLASSES)))

    # what trains
    trainable = {n for n, _ in tuner.trainable_named_parameters()}
    assert (tuner.pet is not None) == (plan.trains == "pet")
    assert (tuner.prompt_learner is not None) == (plan.trains == "prompt")
    if plan.trains == "prompt":
        assert trainable == {"prompt_learner.ctx"}
    elif plan.trains == "pet":
        assert tuner.pet.config.method == plan.pet_method
        assert tuner.pet.config.skip_layers == plan.skip_layers
        assert trainable and all("pet_" in n or "lora" in n for n in trainable)
        first_block = min(int(n.split("resblocks.")[1].split(".")[0]) for n in trainable)
        assert first_block == plan.skip_layers
    else:
        assert trainable == {f"model.{n}" for n in _expected_trainable(model, plan)}
    loss.backward()
    assert all(p.grad is None for n, p in tuner.named_parameters() if n not in trainable)
    assert any(p.grad is not None for n, p in tuner.named_parameters() if n in trainable)


def test_pet_omega_is_skip_layers_only():
    assert trainable_modules_for_mode("lora", 3).skip_layers == 3
    assert trainable_modules_for_mode("lora").skip_layers == 0
    assert "min_block" not in {f.name for f in dataclasses.fields(VLPETConfig)}
    with pytest.raises(TypeError):  # the former name is gone: one name per setting
        VLPETConfig(min_block=1)
    assert not hasattr(VLPETConfig(), "min_block")
    with pytest.raises(ValueError, match="skip_layers must be >= 0"):
        LoRAConfig(skip_layers=-1)


def test_one_pet_method_list_and_one_activation_list():
    from skipkernels import triton as kernels
    from skipkernels.ops import linear
    from skipkernels.pet import config as pet_config
    from skipkernels.skip import modes, tuner
    assert tuner.PET_MODES is modes.PET_MODES is pet_config.METHODS is METHODS
    assert linear.ACTIVATIONS is kernels.ACTIVATIONS
    assert [kernels.activation_code(a) for a in kernels.ACTIVATIONS] == list(range(len(kernels.ACTIVATIONS)))
    with pytest.raises(ValueError, match="unknown activation"):
        kernels.activation_code("relu")


def _literals_listing(names) -> list[str]:
    """Where in the package a tuple, list, set or dict literal holds every one of ``names``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                elements = node.elts
            elif isinstance(node, ast.Dict):
                elements = node.keys
            else:
                continue
            strings = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if set(names) <= strings:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_the_names_are_written_once():
    from skipkernels.triton import ACTIVATIONS
    assert [p.split(":")[0] for p in _literals_listing(METHODS)] == ["skipkernels/pet/config.py"]
    assert [p.split(":")[0] for p in _literals_listing(ACTIVATIONS)] == ["skipkernels/triton/__init__.py"]


def test_bench_modes_map_to_tuner_modes():
    from skipkernels import bench
    for name in bench.DEFAULT_MODES:
        mode = bench.tuner_mode(name)
        assert mode in MODES
        assert mode == (name if name in MODES else "skip")
    assert {bench.tuner_mode(n) for n in bench.ALL_MODES if n.startswith("skip-") or n == "paper"} == {"skip"}


@pytest.mark.parametrize("name", ["paper", "skip-ref", "coop", "lskip-lora"])
def test_the_bench_runner_reads_the_plan(name):
    from skipkernels import bench
    from skipkernels.models import create_model
    scenario = bench.Scenario.default("cpu", quick=True)
    model, tokenizer = create_model(scenario.model, None, device=torch.device("cpu"), seed=0)
    runner = bench.ModeRunner(name, model, tokenizer, scenario, torch.device("cpu"), None)
    assert runner.tuner.skip_layers == (2 if runner.plan.caches_prefix or name == "paper" else 0)  # half of 4
    assert runner.plan == mode_plan(bench.tuner_mode(name), runner.tuner.skip_layers)
    if name != "paper":
        assert runner.plan is runner.tuner.plan
    images = bench._images(scenario, runner.tuner.model, 2, torch.device("cpu"), 0)
    inputs = runner.inputs_for(images)
    assert (inputs.dim() == 3) == runner.plan.caches_prefix  # cached tokens, or the images themselves


def test_bench_modes_are_one_table():
    """Each bench mode's kernels, compilation and capture come from its row of BENCH_MODES."""
    from skipkernels import bench
    from skipkernels.ops.policy import ALL_TRITON, KernelPolicy
    assert bench.mode_policy("skip-triton") == bench.mode_policy("skip-triton-graph") == \
        KernelPolicy("auto", table=ALL_TRITON)
    # the compiled step and its torch.compile base need the compiled loss and CSkip ops (train/step.py)
    assert bench.mode_policy("skip-kernels") == bench.mode_policy("skip-graph") == bench.mode_policy("skip-compile") \
        == bench.mode_policy("skip-compile-graphs") == KernelPolicy("auto")
    assert {bench.mode_policy(m) for m in ("paper", "ft", "coop", "skip-ref", "lskip-lora")} == {KernelPolicy("torch")}
    assert bench.GRAPH_MODES == ("skip-graph", "skip-triton-graph")
    assert [m for m in bench.ALL_MODES if bench.bench_mode(m).step == "compiled"] == ["skip-compile"]
    assert [m for m in bench.ALL_MODES if bench.bench_mode(m).compile_graphs] == ["skip-compile-graphs"]
    cpu = torch.device("cpu")
    available, skipped = bench._available_modes(list(bench.DEFAULT_MODES), cpu)
    assert skipped == {"skip-compile-graphs": "CUDA graphs need a GPU", "skip-triton": "Triton kernels need a GPU",
                       "skip-graph": "CUDA graphs need a GPU", "skip-triton-graph": "CUDA graphs need a GPU"}
    assert "lskip-lora" in available and "paper" in available
    with pytest.raises(ValueError, match="unknown bench mode 'warp'"):
        bench.bench_mode("warp")
