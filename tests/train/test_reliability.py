"""Bad input, faults and determinism: clear errors, nothing lost, same seed -> same run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_clip
from skipkernels import SkipTuner
from skipkernels.cli import main
from skipkernels.data.coop import DatasetError, load_splits
from skipkernels.data.fewshot import sample_few_shot
from skipkernels.data.images import is_readable
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune

FAST = dict(batch_size=8, lr=3e-3, lr_image=3e-3, shots=4, same_class_batches=False, warmup_epochs=0,
            progress=False)


def _copy_synthetic(synthetic_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "synthetic", root / "synthetic")
    return root


def test_unreadable_training_images_are_skipped_and_counted(synthetic_root, tmp_path):
    root = _copy_synthetic(synthetic_root, tmp_path)
    splits = load_splits(root, "synthetic")
    red = [it for it in splits.train if it.label == 0]
    for item in red[:5]:
        with open(item.path, "wb") as f:
            f.write(b"\x89PNG truncated")
    with pytest.warns(UserWarning, match="skipped [1-5] unreadable training images"):
        chosen = sample_few_shot(splits.train, 8, seed=1, readable=is_readable)
    assert sum(1 for it in chosen if it.label == 0) == 8
    assert all(is_readable(it) for it in chosen)
    for item in red[5:10]:
        os.unlink(item.path)
    with pytest.raises(DatasetError, match="fewer than 8 readable"):
        sample_few_shot(splits.train, 8, seed=1, readable=is_readable)


def test_unreadable_test_images_are_skipped_in_evaluation(synthetic_root, tmp_path):
    root = _copy_synthetic(synthetic_root, tmp_path)
    splits = load_splits(root, "synthetic")
    for item in splits.test[:3]:
        with open(item.path, "wb") as f:
            f.write(b"garbage")
    with pytest.warns(UserWarning, match="skipped 3 unreadable test images"):
        results = finetune(root, "synthetic", "skipkernels-tiny", skip=SkipConfig(skip_layers=1),
                           train=TrainConfig(epochs=1, **FAST))
    assert results["finished"] and 0 <= results["accuracy"]["base"] <= 100


def test_unicode_and_very_long_class_names(tokenizer):
    names = ["café au lait", "北京烤鸭", "Ærøskøbing ferry", "x" * 2000, " ".join(["very long"] * 200), "emoji 🐟"]
    tuner = SkipTuner(tiny_clip(), names, tokenizer, SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5))
    loss = tuner.loss(tuner.image_prefix(torch.randn(2, 3, 32, 32)), torch.tensor([1, 3]))
    assert torch.isfinite(loss)
    # a name longer than the context is cut by the tokenizer, which still ends it with EOT
    assert int(tuner.text_cache.pool_index.max()) == 76


def test_same_seed_same_run(synthetic_root, tmp_path):
    runs = []
    for name in ("a", "b"):
        finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=1),
                 train=TrainConfig(epochs=2, deterministic=True, **FAST), out_dir=tmp_path / name)
        runs.append((json.loads((tmp_path / name / "results.json").read_text()),
                     torch.load(tmp_path / name / "model.pt", weights_only=True)))
    torch.use_deterministic_algorithms(False)
    (ra, wa), (rb, wb) = runs
    assert [h["loss"] for h in ra["history"]] == [h["loss"] for h in rb["history"]]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _finetune_cmd(root, out, epochs):
    return [sys.executable, "-m", "skipkernels", "finetune", "--data", str(root), "--dataset", "synthetic",
            "--model", "skipkernels-tiny", "--mode", "skip", "--skip-layers", "1", "--epochs", str(epochs),
            "--shots", "4", "--batch-size", "2", "--mixed-batches", "--lr", "3e-3", "--lr-image", "3e-3",
            "--warmup-epochs", "0", "--no-progress", "--out", str(out)]


@pytest.mark.slow
def test_kill_at_random_points_then_resume_equals_uninterrupted(synthetic_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_finetune_cmd(synthetic_root, straight, 4), check=True, capture_output=True, env=env, timeout=600)
    rng = random.Random(7)
    out = tmp_path / "killed"
    kills = 0
    for delay in (rng.uniform(3.0, 9.0), rng.uniform(3.0, 9.0)):
        proc = subprocess.Popen(_finetune_cmd(synthetic_root, out, 4), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run(_finetune_cmd(synthetic_root, out, 4), check=True, capture_output=True, env=env, timeout=600)
    assert kills >= 1
    assert not list(out.glob(".checkpoint.pt.*")), "a killed write left its temporary file behind"
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fuzz_cases(rng, root, out):
    flags = [["--skip-layers", str(rng.choice([-1, 0, 1, 3, 4, 99]))], ["--top-ratio", str(rng.choice([-1, 0, 0.3, 5]))],
             ["--lam", str(rng.choice([-0.5, 0, 0.2]))], ["--batch-size", str(rng.choice([0, 1, 3, 64]))],
             ["--shots", str(rng.choice([1, 4, 100]))], ["--epochs", str(rng.choice([0, 1]))],
             ["--drop-ratio", str(rng.choice([-0.1, 0.5, 1.0]))], ["--mode", rng.choice(["skip", "ft", "coop"])],
             ["--template", rng.choice(["{}", "no placeholder", "a photo of a {}."])],
             ["--max-top", str(rng.choice([0, 2, 50]))], ["--resample", rng.choice(["fixed", "step"])]]
    args = ["finetune", "--data", str(root), "--dataset", "synthetic", "--model", "skipkernels-tiny",
            "--epochs", "1", "--shots", "4", "--batch-size", "4", "--no-progress", "--out", str(out)]
    for flag in rng.sample(flags, rng.randint(1, 4)):
        args += flag
    return args


def test_fuzz_cli_exits_cleanly(synthetic_root, tmp_path, capsys):
    root = _copy_synthetic(synthetic_root, tmp_path)
    rng = random.Random(1234)
    outcomes = []
    for n in range(10):
        args = _fuzz_cases(rng, root, tmp_path / f"run{n}")
        code = main(args)
        err = capsys.readouterr().err
        assert code in (0, 2), (args, err)
        assert "Traceback" not in err
        if code == 2:
            assert "error:" in err
        outcomes.append(code)
    assert 2 in outcomes  # the fuzzer does reach invalid settings
    split = root / "synthetic" / "split_zhou_Synthetic.json"
    text = split.read_text()
    for corrupt in (text[: len(text) // 2], "[]", '{"train": 5, "val": [], "test": []}', "\x00\xff"):
        split.write_text(corrupt, encoding="utf-8", errors="surrogateescape")
        assert main(["finetune", "--data", str(root), "--dataset", "synthetic", "--model", "skipkernels-tiny",
                     "--epochs", "1", "--no-progress", "--out", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err
        assert "malformed split file" in err and "Traceback" not in err
