import json

import pytest
import torch

from skipkernels.data.coop import load_splits
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.checkpoint import CheckpointError
from skipkernels.train.export import read_tuned
from skipkernels.train.trainer import TrainConfig, TrainingError
from skipkernels.train.job import finetune

FAST = dict(batch_size=8, lr=3e-3, lr_image=3e-3, shots=8, same_class_batches=False, warmup_epochs=0,
            progress=False)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_skip_tuning_learns_the_synthetic_set(synthetic_root, tmp_path):
    results = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=2),
                       train=TrainConfig(epochs=10, **FAST), out_dir=tmp_path)
    chance = 100 / 6
    assert results["accuracy"]["base"] > 2.5 * chance
    assert results["history"][-1]["loss"] < results["history"][0]["loss"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"] == results["accuracy"]
    assert {"cache", "train", "eval", "text_prefix"} <= set(saved["time_s"])
    assert saved["versions"]["torch"] == torch.__version__


def test_exported_state_dict_loads_in_open_clip(synthetic_root, tmp_path, open_clip):
    import skipkernels.models  # registers the embedded config with open_clip
    skipkernels.models.open_clip_module()
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="lskip", skip_layers=2),
             train=TrainConfig(epochs=1, **FAST), out_dir=tmp_path)
    model = open_clip.create_model("skipkernels-tiny", pretrained=str(tmp_path / "model.pt"))
    exported = _weights(tmp_path / "model.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(value, exported[name]), name


@pytest.mark.parametrize("mode", ["skip", "ft"])
def test_resume_after_interruption_equals_uninterrupted_run(mode, synthetic_root, tmp_path):
    skip = SkipConfig(mode=mode, skip_layers=1)
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip, train=TrainConfig(epochs=3, **FAST),
             out_dir=tmp_path / "straight")
    part = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip,
                    train=TrainConfig(epochs=3, stop_after_epochs=1, **FAST), out_dir=tmp_path / "resumed")
    assert not part["finished"] and not (tmp_path / "resumed" / "model.pt").exists()
    done = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip, train=TrainConfig(epochs=3, **FAST),
                    out_dir=tmp_path / "resumed")
    assert done["resumed"] and done["finished"]
    a, b = _weights(tmp_path / "straight" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in done["history"]]


def test_checkpoint_from_another_config_is_refused(synthetic_root, tmp_path):
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=1),
             train=TrainConfig(epochs=2, stop_after_epochs=1, **FAST), out_dir=tmp_path)
    with pytest.raises(CheckpointError, match="other settings.*skip_config.skip_layers: 1 there, 2 now"):
        finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=2),
                 train=TrainConfig(epochs=2, **FAST), out_dir=tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=1),
                 train=TrainConfig(epochs=2, **FAST), out_dir=tmp_path)


def test_non_finite_loss_stops_with_step_and_checkpoint(synthetic_root, tmp_path):
    # an infinite learning rate makes the first update blow up: step 0 is finite, step 1 is not
    with pytest.raises(TrainingError, match="non-finite loss .* epoch 1, step 1 .*last good checkpoint: none"):
        finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=1),
                 train=TrainConfig(epochs=1, **{**FAST, "lr": float("inf"), "lr_image": 1.0}),
                 out_dir=tmp_path)


def test_train_config_validation():
    with pytest.raises(ValueError, match="larger than the 4 shots"):
        TrainConfig(batch_size=8, shots=4)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="learning rates"):
        TrainConfig(lr=0)


def test_coop_and_cskip_modes_run(synthetic_root, tmp_path):
    for mode in ("coop", "cskip"):
        results = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode=mode),
                           train=TrainConfig(epochs=1, **FAST), out_dir=tmp_path / mode)
        assert results["finished"] and 0 <= results["accuracy"]["hm"] <= 100
    # model.pt carries CoOp's context (skipkernels.train.export)
    assert read_tuned(tmp_path / "coop" / "model.pt")["prompt_learner"]["ctx"].shape[0] == 4
    assert not (tmp_path / "coop" / "prompt_learner.pt").exists()
    splits = load_splits(synthetic_root, "synthetic")
    assert len(splits.classnames) == 12


def test_resume_continues_torchs_global_rng(synthetic_root, tmp_path, monkeypatch):
    """A step that draws from torch's global RNG (a PET module's dropout, a user's noise) resumes
    as it would have run on: the checkpoint holds the RNG state. Here the loss is scaled by a
    random factor, so the weights depend on every draw."""
    from skipkernels.skip.tuner import SkipTuner
    plain_loss = SkipTuner.loss
    monkeypatch.setattr(SkipTuner, "loss", lambda self, *a, **k: plain_loss(self, *a, **k) * (1 + torch.rand(())))
    skip = SkipConfig(mode="skip", skip_layers=1)
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip, train=TrainConfig(epochs=3, **FAST),
             out_dir=tmp_path / "straight")
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip,
             train=TrainConfig(epochs=3, stop_after_epochs=1, **FAST), out_dir=tmp_path / "resumed")
    done = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip, train=TrainConfig(epochs=3, **FAST),
                    out_dir=tmp_path / "resumed")
    assert done["resumed"]
    a, b = _weights(tmp_path / "straight" / "model.pt"), _weights(tmp_path / "resumed" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
