"""The zero-shot baseline: ``eval`` without a tuned checkpoint, and finetune's zero_shot_accuracy."""
import json

import pytest

from skipkernels.cli import main
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune

FAST = dict(batch_size=8, lr=3e-3, lr_image=3e-3, shots=8, same_class_batches=False, warmup_epochs=0,
            progress=False)
EVAL = ["eval", "--dataset", "synthetic", "--model", "skipkernels-tiny", "--no-progress"]


def test_finetune_records_zero_shot_accuracy_and_eval_reproduces_it(synthetic_root, tmp_path, capsys):
    results = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=2),
                       train=TrainConfig(epochs=1, **FAST), out_dir=tmp_path / "run", zero_shot=True)
    zero_shot, tuned = results["zero_shot_accuracy"], results["accuracy"]
    assert set(zero_shot) == {"base", "new", "hm"}
    assert results["gain"] == {k: pytest.approx(tuned[k] - zero_shot[k]) for k in tuned}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["zero_shot_accuracy"] == zero_shot
    assert "zero_shot_eval" in results["time_s"]

    # the trainer's model starts from open_clip's seed-0 random weights: eval without weights is that model
    assert main(EVAL + ["--data", str(synthetic_root)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == pytest.approx(zero_shot)
    assert "random weights" in captured.err

    # given weights as --pretrained are evaluated as they are (here the tuned ones)
    assert main(EVAL + ["--data", str(synthetic_root), "--pretrained", str(tmp_path / "run" / "model.pt")]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(tuned)


def test_zero_shot_is_off_by_default(synthetic_root, tmp_path):
    results = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="lskip", skip_layers=2),
                       train=TrainConfig(epochs=1, **FAST), out_dir=tmp_path)
    assert results["zero_shot_accuracy"] is None and results["gain"] is None
