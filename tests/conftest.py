import os
import sys
from pathlib import Path

import torch

# Tests are grouped by area (ops/, kernels/, skip/, pet/, models/, train/, data/, cli/, reproduce/,
# benchmarks/, docs/); the helpers they share (kernel_checks, pet_checks, hf_models, bad_inputs,
# reproduce_data) are in support/.
sys.path.insert(0, str(Path(__file__).parent / "support"))

# Triton kernels run on the CPU through the interpreter; it must be set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from skipkernels._compat import import_open_clip  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# Class names of the tuner tests: short and long prompts, one far longer than the rest
TUNER_CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "a very long class name with many words",
                 "cat", "dog", "purple hexagon"]


def tiny_clip(block="default", seed=0, layers=3, **extra):
    """A small random-weight open_clip CLIP; ``block='custom'`` builds CustomResidualAttentionBlock."""
    open_clip = import_open_clip()
    torch.manual_seed(seed)
    vision = dict(image_size=32, patch_size=8, width=64, head_width=16, layers=layers)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=layers)
    if block == "custom":
        vision.update(block_type="custom", qk_norm=extra.pop("qk_norm", False))
        text.update(block_type="custom")
    if "ls_init_value" in extra:
        vision["ls_init_value"] = text["ls_init_value"] = extra.pop("ls_init_value")
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, **extra)
    # Random LayerNorm affine parameters so a mistake in their use shows.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model


def plain_loss_and_grads(model, images, labels, classnames, tokenizer, template="a photo of a {}."):
    """open_clip's own forward (no skipkernels): the model's logits over ``classnames`` (with its
    logit_bias, if any), cross-entropy, and the gradients of every parameter that got one."""
    model.zero_grad(set_to_none=True)
    f = model.encode_image(images, normalize=True)
    t = model.encode_text(tokenizer([template.format(c) for c in classnames]).to(images.device), normalize=True)
    logits = model.logit_scale.exp() * f @ t.T
    if getattr(model, "logit_bias", None) is not None:
        logits = logits + model.logit_bias
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tuner_loss_and_grads(tuner, inputs, labels):
    tuner.zero_grad(set_to_none=True)
    loss = tuner.loss(inputs, labels)
    loss.backward()
    return loss.detach(), {n[len("model."):]: p.grad.clone() for n, p in tuner.named_parameters()
                           if p.grad is not None}


def assert_grads_equal(expected, actual, rel=2e-5):
    # fp32 rounding differs between fused and unfused paths: compare relative to each tensor's scale
    assert expected.keys() == actual.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        assert (expected[name] - actual[name]).abs().max().item() <= rel * scale + 1e-8, name


@pytest.fixture(scope="session")
def open_clip():
    return import_open_clip()


@pytest.fixture(scope="session")
def tokenizer(open_clip):
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from skipkernels.data.synthetic import ensure_synthetic
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


def tiny_runs(synthetic_root, tmp_path_factory, modes, **train) -> dict:
    """One-epoch finetune runs of the shipped tiny model on the synthetic set, one folder per mode."""
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.job import finetune
    from skipkernels.train.trainer import TrainConfig
    out = {}
    for mode in modes:
        folder = tmp_path_factory.mktemp(mode)
        finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode=mode, skip_layers=1),
                 train=TrainConfig(epochs=1, **train), out_dir=folder)
        out[mode] = folder
    return out


# -- optional packages ----------------------------------------------------------------------------
# A test module that needs an optional package throughout calls pytest.importorskip at its top.
# The tests below need one only in part (a chart drawn, a Hugging Face model built): where the
# package is not installed they are skipped, naming it and the extra that installs it.
NEEDS = {
    "matplotlib": [
        "benchmarks/test_plots.py::test_finetune_writes_metrics_csv_and_training_png",
        "benchmarks/test_plots.py::test_bench_chart_is_a_matplotlib_png",
        "benchmarks/test_plots.py::test_demo_chart_compares_the_modes",
        "benchmarks/test_plots.py::test_the_accuracy_panels_title_says_zero_shot_only_when_it_draws_it",
        "benchmarks/test_plots.py::test_bar_chart_shares_the_y_scale_when_asked_and_marks_named_bars",
        "benchmarks/test_bench_inference.py::test_inference_bench_writes_every_method_json_and_chart",
        "benchmarks/test_bench_classes.py::test_the_class_scaling_report_writes_its_json_and_log_log_chart",
        "benchmarks/test_bench_e2e.py::test_bench_quick_writes_table_json_and_chart",
        "cli/test_cli.py::test_demo_prints_the_comparison_table",
        "reproduce/test_reproduce.py::test_all_four_protocols_end_to_end",
    ],
    "transformers": [
        "train/test_export.py::test_hf_run_exports_with_save_pretrained",
    ],
}


def missing_reason(package: str) -> str | None:
    """Why a test that needs ``package`` cannot run here, or None where it is installed."""
    import importlib.util
    from skipkernels._compat import install_hint
    if importlib.util.find_spec(package) is not None:
        return None
    return f"{package} is not installed ({install_hint(package)})"


def pytest_collection_modifyitems(config, items):
    from pathlib import Path
    here = os.path.dirname(__file__)
    for package, tests in NEEDS.items():
        stale = [t for t in tests if f"def {t.split('::')[1]}(" not in Path(here, t.split("::")[0]).read_text()]
        if stale:  # a renamed test would silently lose its skip
            raise pytest.UsageError(f"tests/conftest.py NEEDS[{package!r}] names tests that do not exist: {stale}")
        reason = missing_reason(package)
        if reason is None:
            continue
        for item in items:
            if any(item.nodeid.split("[")[0].endswith("/" + test) for test in tests):
                item.add_marker(pytest.mark.skip(reason=reason))
