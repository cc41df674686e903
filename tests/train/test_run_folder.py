"""A run's folder holds one run (its identity is checked before any work), and its model.pt is the
whole tuned model: alone, ``eval`` and ``predict`` reproduce the run's accuracy. Files follow the
user's umask. The demo's pretrained model and data set, one epoch, two shots."""
import json
import os
import shutil
import stat

import pytest
import torch

from skipkernels.cli import main
from skipkernels.data.coop import load_splits
from skipkernels.data.fewshot import base_new_labels
from skipkernels.data.shapes import ensure_shapes
from skipkernels.ops.policy import ALL_TRITON, KernelPolicy
from skipkernels.options import identity_fields
from skipkernels.pretrain_tiny import WEIGHTS
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train import checkpoint, export
from skipkernels.train.checkpoint import CheckpointError
from skipkernels.train.evaluate import class_group
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune

MODEL = "skipkernels-tiny-shapes"
SKIP = dict(skip_layers=1)
TRAIN = dict(epochs=1, batch_size=4, lr=5e-2, lr_image=5e-2, shots=2, same_class_batches=False, warmup_epochs=0,
             progress=False)
MODES = ("skip", "ft", "coop", "lora", "adapter", "vlpet-small", "lskip-lora")


def _run(root, out, mode="skip", skip=None, train=None, **kwargs):
    kwargs = {"pretrained": str(WEIGHTS), **kwargs}
    return finetune(kwargs.pop("data_root", root), kwargs.pop("dataset", "shapes"), kwargs.pop("model", MODEL),
                    kwargs.pop("pretrained"), SkipConfig(**{**SKIP, "mode": mode, **(skip or {})}),
                    TrainConfig(**{**TRAIN, **(train or {})}), out, **kwargs)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory):
    """A finished run of each mode, written under umask 022."""
    previous = os.umask(0o022)
    try:
        folders = {mode: tmp_path_factory.mktemp(mode) for mode in MODES}
        for mode, folder in folders.items():
            _run(root, folder, mode, zero_shot=True)
        return folders
    finally:
        os.umask(previous)


def _results(folder):
    return json.loads((folder / "results.json").read_text())


# ---------------------------------------------------------------- the run's identity
# One other value for every identity field; the refusal must name the field.
CONFIG_CHANGES = {
    "skip_config": {"mode": "lskip", "skip_layers": 2, "top_ratio": 0.25, "top_count": 1, "max_top": 3, "lam": 0.5,
                    "resample": "step", "drop_ratio": 0.25, "truncate_text": False, "prune_last_block": False,
                    "template": "a {}.", "cache_dtype": "bfloat16", "coop_n_ctx": 2, "coop_init": "a photo"},
    "train_config": {"epochs": 2, "batch_size": 2, "lr": 1e-2, "lr_image": 1e-2, "momentum": 0.5,
                     "weight_decay": 0.0, "warmup_epochs": 1, "warmup_lr": 1e-5, "shots": 3,
                     "same_class_batches": None, "seed": 2, "amp": None, "deterministic": True},
    "kernel_policy": {"backend": "torch", "table": ALL_TRITON},
}
CONFIGS = {"skip_config": SkipConfig, "train_config": TrainConfig, "kernel_policy": KernelPolicy}
# the run's other settings: (identity key, finetune's keyword arguments)
OTHER_CHANGES = [("model", {"model": "skipkernels-tiny"}), ("pretrained", {"pretrained": "none"}),
                 ("model_seed", {"model_seed": 3}), ("tokenizer", {"tokenizer": "ViT-B-16"}),
                 ("classes", {"base_to_new": False})]


def test_every_identity_field_has_a_change_below():
    for section, cls in CONFIGS.items():
        assert [f.name for f in identity_fields(cls)] == list(CONFIG_CHANGES[section]), section
    names = {f.name for f in identity_fields(TrainConfig)}
    assert {"workers", "progress", "eval_batch_size", "cache_batch_size", "stop_after_epochs"}.isdisjoint(names)
    assert "cache_budget_gb" not in {f.name for f in identity_fields(SkipConfig)}


@pytest.mark.parametrize("key,changes", [(f"{section}.{name}", (section, {name: value}))
                                         for section, fields in CONFIG_CHANGES.items()
                                         for name, value in fields.items()] + OTHER_CHANGES)
def test_a_rerun_with_another_setting_is_refused_naming_it(key, changes, runs, root):
    folder = runs["skip"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    if isinstance(changes, tuple):
        section, change = changes
        kwargs = {"skip": change} if section == "skip_config" else {"train": change} if section == "train_config" \
            else {"policy": KernelPolicy(**change)}
    else:
        kwargs = changes
    with pytest.raises(CheckpointError, match="holds a run with other settings") as err:
        _run(root, folder, **kwargs)
    stored = _results(folder)["identity"].get(key)  # top_count: recorded only where set (SkipConfig)
    assert f"{key}: {stored!r} there" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # before any work


def test_other_data_is_refused_naming_what_differs(root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(root / "shapes", data / "shapes")
    _run(data, tmp_path / "run")
    with pytest.raises(CheckpointError, match="data: ") as err:
        _run(root, tmp_path / "run")
    assert "train_items" in str(err.value)  # the items' paths differ too
    split_file = data / "shapes" / "split_zhou_Shapes.json"
    split = json.loads(split_file.read_text())
    split["test"] = split["test"][1:]
    split_file.write_text(json.dumps(split))
    with pytest.raises(CheckpointError, match="test_items") as err:
        _run(data, tmp_path / "run")
    assert "train_items" not in str(err.value)  # the few-shot sample is the same
    split["train"] = split["train"][::-1]
    split_file.write_text(json.dumps(split))
    with pytest.raises(CheckpointError, match="train_items"):
        _run(data, tmp_path / "run")


@pytest.mark.parametrize("change", [{}, {"train": {"workers": 1, "eval_batch_size": 7, "progress": True,
                                                   "eval_every": 1, "cache_batch_size": 3}},
                                    {"skip": {"cache_budget_gb": 0.5}}])
def test_a_finished_run_rerun_says_so_and_changes_nothing(change, runs, root, capsys):
    folder = runs["skip"]
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    results = _run(root, folder, **change)
    assert "finished: nothing to do" in capsys.readouterr().err
    assert results == _results(folder)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_the_same_weights_elsewhere_are_the_same_run(runs, root, tmp_path):
    copy = tmp_path / "weights.safetensors"
    shutil.copyfile(WEIGHTS, copy)
    assert _run(root, runs["skip"], pretrained=str(copy))["finished"]  # identified by content
    with copy.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckpointError, match="pretrained: 'sha256:"):
        _run(root, runs["skip"], pretrained=str(copy))


def test_an_unfinished_run_resumes_and_no_resume_starts_over(root, tmp_path, capsys):
    out = tmp_path / "run"
    part = _run(root, out, "adapter", train={"epochs": 2, "stop_after_epochs": 1})
    assert not part["finished"] and not (out / "model.pt").exists()
    with pytest.raises(CheckpointError, match="train_config.lr: 0.05 there, 0.01 now"):
        _run(root, out, "adapter", train={"epochs": 2, "lr": 1e-2})
    done = _run(root, out, "adapter", train={"epochs": 2, "eval_batch_size": 5})
    assert done["resumed"] and done["finished"]
    assert _results(out)["identity"]["train_config.lr"] == 0.05
    (out / "pet.pt").write_bytes(b"what an earlier version wrote")
    capsys.readouterr()
    fresh = _run(root, out, "ft", train={"lr": 1e-2}, resume=False)
    assert "removed the earlier run's" in capsys.readouterr().err
    assert not fresh["resumed"] and not (out / "pet.pt").exists()
    saved = _results(out)
    assert saved["identity"]["train_config.lr"] == 0.01 and saved["identity"]["skip_config.mode"] == "ft"
    assert saved["mode"] == "ft" and len(saved["history"]) == 1


def test_an_old_folder_without_identity_is_refused(runs, root, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(runs["skip"], out)
    results = _results(out)
    del results["identity"]
    (out / "results.json").write_text(json.dumps(results))
    with pytest.raises(CheckpointError, match="does not record the settings"):
        _run(root, out)


# ---------------------------------------------------------------- model.pt is the whole model
def _eval(root, checkpoint, *extra, capsys):
    capsys.readouterr()
    code = main(["eval", "--data", str(root), "--dataset", "shapes", "--checkpoint", str(checkpoint),
                 "--no-progress", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("mode", MODES)
def test_model_pt_alone_reproduces_the_runs_accuracy(mode, runs, root, tmp_path, capsys):
    folder = runs[mode]
    results = _results(folder)
    assert results["accuracy"] != results["zero_shot_accuracy"]  # something was tuned
    assert not (folder / "pet.pt").exists() and not (folder / "prompt_learner.pt").exists()
    assert _eval(root, folder / "model.pt", capsys=capsys) == pytest.approx(results["accuracy"], abs=1e-9)
    alone = tmp_path / "model.pt"
    shutil.copyfile(folder / "model.pt", alone)  # no results.json beside it
    assert _eval(root, alone, "--model", MODEL, capsys=capsys) == pytest.approx(results["accuracy"], abs=1e-9)
    tuned = export.read_tuned(alone)
    assert (tuned is not None) == (mode in ("coop", "adapter", "vlpet-small"))
    if tuned is not None:  # it carries its model and what rebuilds the tuned parts
        assert _eval(root, alone, capsys=capsys) == pytest.approx(results["accuracy"], abs=1e-9)
        assert tuned["model"] == MODEL and tuned["skip_config"]["mode"] == mode
    else:  # a plain open_clip state_dict: LoRA is folded into the weights
        assert not any("lora" in key for key in torch.load(alone, weights_only=True))


@pytest.mark.parametrize("mode", ("skip", "coop", "adapter", "lskip-lora"))
def test_predict_with_model_pt_alone_reproduces_the_base_accuracy(mode, runs, root, tmp_path, capsys):
    splits = load_splits(root, "shapes")
    items, names = class_group(splits.test, splits.classnames, base_new_labels(len(splits.classnames))[0])
    (tmp_path / "images").mkdir()
    for i, it in enumerate(items):  # one folder of the base test images, in order
        shutil.copyfile(it.path, tmp_path / "images" / f"{i:04d}.png")
    out = tmp_path / "p.json"
    assert main(["predict", str(tmp_path / "images"), "--classes", ",".join(names), "--checkpoint",
                 str(runs[mode] / "model.pt"), "--top-k", "1", "--out", str(out), "--no-progress"]) == 0
    predicted = [row["top"][0]["class"] for row in json.loads(out.read_text())]
    correct = sum(p == it.classname for p, it in zip(predicted, items))
    assert 100.0 * correct / len(items) == pytest.approx(_results(runs[mode])["accuracy"]["base"])
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "images" / "0000.png"), "--checkpoint", str(runs[mode] / "model.pt"),
                 "--top-k", "99", "--no-progress"]) == 0  # the run's classes, base and new, from its results.json
    assert f"top {len(splits.classnames)}" in capsys.readouterr().out


def test_checkpoint_of_another_model_or_missing_parts_is_refused_by_name(runs, root, tmp_path, capsys):
    run = runs["skip"]
    assert main(["eval", "--data", str(root), "--dataset", "shapes", "--checkpoint", str(run / "model.pt"),
                 "--model", "skipkernels-tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--model skipkernels-tiny differs from the model skipkernels-tiny-shapes" in err and "Traceback" not in err
    alone = tmp_path / "lone" / "model.pt"
    alone.parent.mkdir()
    shutil.copyfile(run / "model.pt", alone)
    assert main(["eval", "--data", str(root), "--dataset", "shapes", "--checkpoint", str(alone), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not hold weights of ViT-B-16" in err and "give the model it was tuned from as --model" in err
    assert "Traceback" not in err
    # a folder in the layout of earlier versions: open_clip's weights in model.pt, the adapter beside it
    old = tmp_path / "old"
    shutil.copytree(runs["adapter"], old)
    tuned = export.read_tuned(old / "model.pt")
    torch.save(tuned["weights"], old / "model.pt")
    assert main(["eval", "--data", str(root), "--dataset", "shapes", "--checkpoint", str(old), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{old / 'pet.pt'} (missing)" in err and "Traceback" not in err
    torch.save(tuned["pet"], old / "pet.pt")
    assert _eval(root, old, capsys=capsys) == pytest.approx(_results(old)["accuracy"], abs=1e-9)
    assert main(["eval", "--data", str(root), "--dataset", "shapes", "--pretrained", str(runs["adapter"] / "model.pt"),
                 "--model", MODEL, "--no-progress"]) == 2
    assert "give it as --checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- file modes
def test_run_files_follow_the_umask(runs, tmp_path):
    for folder in (runs["skip"], runs["coop"]):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
        assert {"checkpoint.pt", "model.pt", "results.json"} <= set(modes)
        assert set(modes.values()) == {0o644}, modes
    previous = os.umask(0o077)
    try:
        checkpoint.atomic_save({"x": torch.zeros(1)}, tmp_path / "private.pt")
        checkpoint.atomic_write_text("{}", tmp_path / "private.json")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "private.pt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".private*"))


def test_class_labels_of_one_class_has_its_all_group():
    """"all" splits nothing, so a one-class set still has it; base and new need two classes."""
    from skipkernels.train.evaluate import class_labels
    assert class_labels(1, "all") == {"all": [0]}
    assert class_labels(4, "base2new") == {"base": [0, 1], "new": [2, 3]}
    with pytest.raises(ValueError):
        class_labels(1, "base2new")
