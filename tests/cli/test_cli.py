import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from skipkernels.cli import _add_train_args, _configs, _policy, build_parser, main
from skipkernels.ops.policy import BACKENDS, KernelPolicy
from skipkernels.options import add_options, cli_fields, flag_of, from_args, option, spec
from skipkernels.skip.cskip import RESAMPLE_MODES
from skipkernels.skip.tuner import CACHE_DTYPES, MODES, SkipConfig
from skipkernels.train.report import REPORT_TO
from skipkernels.train.step import STEP_KINDS, UPDATE_MODES, WORKING_COPY_MODES
from skipkernels.train.trainer import AMP_MODES, TrainConfig, autocast_dtype_for


def test_info_command(capsys):
    assert main(["info", "--json"]) == 0
    out = capsys.readouterr().out
    assert "compiled ops: " in out and '"compiled_ops"' in out
    # Where they come from, in one of the states the README lists.
    assert any(state in out for state in ("built at install", "built and cached", "compiled in this process",
                                          "compiled on first use", "unavailable"))


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


# ---------------------------------------------------------------- flags derived from the configs

# Kept off the command line: stop_after_epochs, a test's setting.
OFF_THE_COMMAND_LINE = {(TrainConfig, "stop_after_epochs")}
# The validated constants behind each field with choices; None is "none" on the command line.
CHOICES = {(SkipConfig, "mode"): MODES, (SkipConfig, "resample"): RESAMPLE_MODES,
           (SkipConfig, "cache_dtype"): CACHE_DTYPES, (TrainConfig, "amp"): AMP_MODES,
           (TrainConfig, "report_to"): REPORT_TO, (TrainConfig, "step"): STEP_KINDS,
           (TrainConfig, "update_in_backward"): UPDATE_MODES, (TrainConfig, "working_copies"): WORKING_COPY_MODES,
           (KernelPolicy, "backend"): BACKENDS}


def _train_parser():
    parser = argparse.ArgumentParser()
    _add_train_args(parser)
    return parser


def _finetune(*argv):
    return _configs(build_parser().parse_args(["finetune", *argv]))


@pytest.mark.parametrize("cls", [SkipConfig, TrainConfig, KernelPolicy])
def test_every_config_field_declares_its_flag(cls):
    off = {f.name for f in dataclasses.fields(cls) if not spec(f).cli}
    assert off == {name for c, name in OFF_THE_COMMAND_LINE if c is cls}
    for field in cli_fields(cls):
        assert spec(field).help, f"{cls.__name__}.{field.name} has no help"


@pytest.mark.parametrize("cls", [SkipConfig, TrainConfig, KernelPolicy])
def test_each_flag_defaults_to_the_dataclass_default_with_the_validated_choices(cls):
    parser = _train_parser()
    defaults = parser.parse_args([])
    for field in cli_fields(cls):
        action = parser._option_string_actions[flag_of(field)]
        assert action.dest == field.name
        assert getattr(defaults, field.name) == field.default, field.name
        choices = CHOICES.get((cls, field.name))
        expected = None if choices is None else ["none" if c is None else c for c in choices]
        assert action.choices == expected, field.name


def test_the_choices_are_what_the_configs_accept():
    for mode in MODES:
        assert SkipConfig(mode=mode).mode == mode
    for dtype in CACHE_DTYPES + (None,):
        assert SkipConfig(cache_dtype=dtype).cache_dtype == dtype
    with pytest.raises(ValueError, match="cache_dtype"):
        SkipConfig(cache_dtype="int8")
    for amp in AMP_MODES:
        autocast_dtype_for(amp, torch.device("cpu"))
        autocast_dtype_for(amp, torch.device("cuda"))


def test_the_kernel_policy_comes_from_its_flags_and_deterministic_is_the_trainings():
    args = build_parser().parse_args(["finetune"])
    assert _policy(args, TrainConfig()) == KernelPolicy()
    args = build_parser().parse_args(["finetune", "--backend", "torch", "--kernel-table", "t.json", "--deterministic"])
    _, train = _configs(args)
    assert _policy(args, train) == KernelPolicy("torch", table="t.json") and train.deterministic
    assert [f.name for f in dataclasses.fields(KernelPolicy)] == ["backend", "table"]  # one field per setting


def test_the_default_command_line_gives_the_default_configs():
    skip, train = _finetune()
    assert train == TrainConfig()
    assert skip == SkipConfig()
    assert "seed" not in {f.name for f in dataclasses.fields(SkipConfig)}  # one seed: TrainConfig's


def test_flags_that_are_not_one_to_one_with_a_field():
    skip, train = _finetune("--no-truncate-text", "--no-prune-last-block", "--mixed-batches", "--amp", "none",
                            "--no-progress", "--seed", "7", "--cache-dtype", "bfloat16", "--deterministic")
    assert not skip.truncate_text and not skip.prune_last_block and skip.cache_dtype == "bfloat16"
    assert train.same_class_batches is False and train.amp is None and not train.progress and train.deterministic
    assert train.seed == 7
    assert _finetune("--amp", "fp16")[1].amp == "fp16"
    assert _finetune("--epochs", "8", "--protocol-epochs", "--dataset", "SUN397")[1].epochs == 2
    assert _finetune("--epochs", "8", "--protocol-epochs", "--dataset", "dtd")[1].epochs == 8
    assert _finetune("--epochs", "8", "--dataset", "imagenet")[1].epochs == 8


def test_non_default_flags_round_trip():
    skip, train = _finetune("--mode", "lskip-lora", "--skip-layers", "3", "--top-ratio", "0.25", "--max-top", "7",
                            "--lam", "0.5", "--resample", "step", "--drop-ratio", "0.1", "--template", "a {} photo",
                            "--coop-n-ctx", "2", "--coop-init", "a photo", "--cache-budget-gb", "0.5",
                            "--batch-size", "2", "--lr", "0.1", "--lr-image", "0.2", "--momentum", "0.5",
                            "--weight-decay", "0", "--warmup-epochs", "0", "--warmup-lr", "1e-3", "--shots", "0",
                            "--workers", "3", "--eval-every", "2", "--cache-batch-size", "8",
                            "--eval-batch-size", "16")
    assert skip == SkipConfig(mode="lskip-lora", skip_layers=3, top_ratio=0.25, max_top=7, lam=0.5,
                              resample="step", drop_ratio=0.1, template="a {} photo", coop_n_ctx=2,
                              coop_init="a photo", cache_budget_gb=0.5)
    assert train == TrainConfig(batch_size=2, lr=0.1, lr_image=0.2, momentum=0.5, weight_decay=0.0, warmup_epochs=0,
                                warmup_lr=1e-3, shots=0, workers=3, eval_every=2, cache_batch_size=8,
                                eval_batch_size=16)


@pytest.mark.parametrize("argv", [["--mode", "nope"], ["--resample", "never"], ["--amp", "fp8"],
                                  ["--cache-dtype", "int8"], ["--skip-layers", "two"], ["--stop-after-epochs", "1"]])
def test_values_outside_a_field_are_rejected_by_the_parser(argv):
    with pytest.raises(SystemExit):
        _train_parser().parse_args(argv)


def test_options_of_a_dataclass():
    @dataclasses.dataclass
    class Config:
        count: int = option(3, "a count")
        ratio: float = option(1, "a ratio")  # the annotation, not the default, gives the type
        name: str | None = option(None, "a name", choices=("a", "b", None))
        on: bool = option(True, "a feature")
        strict: bool = option(False, "strictness")
        rule: bool | None = option(None, "the other rule", flag="--other-rule", const=False)
        hidden: int = option(5, cli=False)

    parser = argparse.ArgumentParser()
    add_options(parser, Config)
    assert from_args(Config, parser.parse_args([])) == Config()
    args = parser.parse_args(["--count", "4", "--ratio", "2.5", "--name", "b", "--no-on", "--strict", "--other-rule"])
    assert from_args(Config, args, hidden=6) == Config(4, 2.5, "b", False, True, False, 6)
    assert from_args(Config, parser.parse_args(["--name", "none"])).name is None
    assert isinstance(from_args(Config, parser.parse_args(["--ratio", "2"])).ratio, float)
    assert "disable a feature" in parser.format_help()


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "skipkernels", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "finetune" in proc.stdout and "demo" in proc.stdout


def test_quickstart_example_runs(tmp_path):
    import os
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "python" / "quickstart.py"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SKIPKERNELS_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1: loss" in proc.stdout


# ---------------------------------------------------------------- flags that cannot work here

def _finetune_never_called(monkeypatch):
    import skipkernels.train.job as job
    calls = []
    monkeypatch.setattr(job, "finetune", lambda *a, **k: calls.append(a) or pytest.fail("finetune ran"))
    return calls


@pytest.mark.parametrize("extra,message", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "gpu"], "expected cpu, cuda"),
    (["--backend", "triton"], "TRITON_INTERPRET=1"),
    (["--backend", "cuda", "--device", "cpu"], "the device is cpu"),
    (["--kernel-table", "/no/such/table.json"], "no such file"),
    (["--kernel-table", "{bad}"], "not a measured table"),
    (["--kernel-table", "{entry}"], "an entry lacks"),
    (["--report-to", "tensorboard"], "pip install tensorboard"),
])
def test_a_flag_that_cannot_work_fails_before_the_model_loads(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "entry.json").write_text(json.dumps({"entries": [{"device": "H200", "op": "linear"}]}))
    extra = [a.format(bad=tmp_path / "bad.json", entry=tmp_path / "entry.json") for a in extra]
    calls = _finetune_never_called(monkeypatch)
    assert main(["finetune", "--model", "skipkernels-tiny", "--out", str(tmp_path / "run"), "--no-progress",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not calls
    assert not (tmp_path / "run").exists()


def test_eval_demo_and_bench_share_the_device_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["eval", "--data", str(tmp_path), "--device", "cuda"], ["demo", "--device", "cuda:0"],
                 ["bench", "--device", "cuda"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "CUDA is not available" in err and "Traceback" not in err


def test_backends_that_can_run_pass_the_check(monkeypatch):
    from skipkernels import _ext
    from skipkernels.ops.policy import check_runnable
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for backend in ("auto", "torch", "triton") + (("cpu",) if _ext.COMPILED_OPS else ()):
        check_runnable(KernelPolicy(backend), torch.device("cpu"))
    with pytest.raises(ValueError, match="the device is cuda"):
        check_runnable("cpu", torch.device("cuda"))


def test_an_autocast_dtype_the_device_lacks_is_refused():
    from skipkernels.flags import check_autocast
    for dtype in (None, torch.bfloat16, torch.float16):  # torch's CPU autocast runs both
        check_autocast(torch.device("cpu"), dtype)
    with pytest.raises(ValueError, match="--amp float64: autocast on cpu does not support it"):
        check_autocast(torch.device("cpu"), torch.float64)


def test_a_measured_table_written_by_the_tool_passes_the_check(tmp_path):
    from skipkernels.ops.measured import check_table
    entry = {"device": "H200", "op": "linear", "pass": "fwd", "dtype": "bf16", "dims": [8, 8], "rows": 4,
             "speedup": 1.2}
    (tmp_path / "t.json").write_text(json.dumps({"entries": [entry]}))
    for table in (None, "all-triton", str(tmp_path / "t.json")):
        check_table(table)


# ---------------------------------------------------------------- help, table, shipped weights, repr

@pytest.mark.parametrize("command", ["finetune", "eval", "predict", "demo", "bench"])
def test_help_shows_each_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    printed = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS) or not action.option_strings:
            continue
        text = formatter._expand_help(action)
        assert "(default:" in text and "".join(text.split()) in printed, f"{command} {action.option_strings}: {text!r}"
    if command == "finetune":
        assert "(default:0.5)" in printed and "(default:20)" in printed and "(default:ViT-B-16)" in printed


def test_the_demo_table_fits_its_longest_mode_name():
    from skipkernels.cli import _format_table
    row = {"accuracy": {"base": 80.0, "new": 70.0, "hm": 74.67}, "time_s": {"train": 1.0, "cache": 0.5},
           "peak_train_memory_mb": 3.0, "trainable_params": 1234}
    lines = _format_table([{**row, "mode": m} for m in ("ft", "lskip-vlpet-middle-x", "skip")]).splitlines()
    width = len("lskip-vlpet-middle-x")
    assert lines[0].startswith(f"{'mode':<{width}}  base %")
    for line, mode in zip(lines[2:], ("ft", "lskip-vlpet-middle-x", "skip")):
        assert len(line) == len(lines[0]) and line[:width + 1] == f"{mode:<{width}} ", line  # columns line up
    assert lines[3].split()[:2] == ["lskip-vlpet-middle-x", "80.00"]


def test_the_shipped_weights_load_by_name(capsys):
    from skipkernels.models import SHIPPED_WEIGHTS, create_model
    from skipkernels.pretrain_tiny import WEIGHTS
    from safetensors.torch import load_file
    assert SHIPPED_WEIGHTS["skipkernels-tiny-shapes"] == WEIGHTS and WEIGHTS.is_file()
    model, _ = create_model("skipkernels-tiny-shapes")
    assert "shipped pretrained weights" in capsys.readouterr().err
    shipped = load_file(str(WEIGHTS))
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.equal(model.state_dict()[name], shipped[name])
    random, _ = create_model("skipkernels-tiny-shapes", "none", seed=0)
    assert not torch.equal(random.state_dict()[name], shipped[name])
    assert "shipped" not in capsys.readouterr().err
