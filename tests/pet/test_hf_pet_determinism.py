"""The same seed gives the same weights on Hugging Face models too: PET modes run twice in fresh
processes train bit-identical weights, and a resumed run ends where an uninterrupted one does.

The fault this guards against: ``create_model("hf:...")`` did not seed torch's RNG, so the PET
modules' initial weights (drawn after the model is built) came from each process's own random
state and every run trained different weights."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'skipkernels[hf]')")

from hf_models import tiny_hf  # noqa: E402
from skipkernels.models import create_model  # noqa: E402
from hf_models import word_tokenizer as _word_tokenizer  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in ("clip", "siglip"):
        folder = root / f"tiny-{family}"
        tiny_hf(family).save_pretrained(folder)
        _word_tokenizer().save_pretrained(folder)
        out[family] = folder
    return out


def _finetune(data_root, folder, mode, out, epochs=2, extra=()):
    args = [sys.executable, "-m", "skipkernels", "finetune", "--data", str(data_root), "--dataset", "synthetic",
            "--model", f"hf:{folder}", "--mode", mode, "--skip-layers", "1", "--epochs", str(epochs),
            "--batch-size", "4", "--shots", "4", "--warmup-epochs", "0", "--lr", "3e-3", "--lr-image", "3e-3",
            "--amp", "none", "--deterministic", "--no-progress", "--out", str(out), *extra]
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _tensors(state, prefix=""):
    """Every tensor of a saved run (model.pt nests the model's and the PET modules' weights)."""
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{key}.")
        elif torch.is_tensor(value):
            yield prefix + key, value


def _assert_bit_identical(a, b):
    wa, wb = (dict(_tensors(torch.load(out / "model.pt", weights_only=True))) for out in (a, b))
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("family, mode", [("clip", "vlpet-small"), ("clip", "lora"), ("siglip", "lora"),
                                          ("clip", "lskip-lora")])
def test_a_pet_run_on_a_hf_model_is_the_same_in_two_fresh_processes(family, mode, folders, synthetic_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _finetune(synthetic_root, folders[family], mode, a)
    _finetune(synthetic_root, folders[family], mode, b)
    _assert_bit_identical(a, b)
    history = [json.loads((out / "results.json").read_text())["history"] for out in (a, b)]
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]]


def test_a_resumed_pet_run_on_a_hf_model_ends_where_an_uninterrupted_one_does(folders, synthetic_root, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _finetune(synthetic_root, folders["clip"], "vlpet-small", straight, epochs=3)
    # The first process stops after epoch 1 with its checkpoint on disk, as a kill after that
    # checkpoint leaves it; the second, a fresh process, resumes from it.
    script = (
        "import sys; from skipkernels.train.job import finetune; from skipkernels.skip.tuner import SkipConfig; "
        "from skipkernels.train.trainer import TrainConfig; "
        "finetune(sys.argv[1], 'synthetic', 'hf:' + sys.argv[2], skip=SkipConfig(mode='vlpet-small', skip_layers=1), "
        "train=TrainConfig(epochs=3, stop_after_epochs=1, batch_size=4, shots=4, warmup_epochs=0, lr=3e-3, "
        "lr_image=3e-3, amp='none', deterministic=True, progress=False), out_dir=sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(synthetic_root), str(folders["clip"]), str(resumed)],
                   check=True, capture_output=True, env=ENV, timeout=600)
    assert (resumed / "checkpoint.pt").is_file() and not (resumed / "model.pt").exists()
    _finetune(synthetic_root, folders["clip"], "vlpet-small", resumed, epochs=3)
    assert json.loads((resumed / "results.json").read_text())["resumed"]
    _assert_bit_identical(straight, resumed)


def test_create_model_seeds_a_hf_models_random_weights(folders):
    first, _ = create_model(f"hf:{folders['clip']}", "none", seed=3)
    torch.rand(7)  # whatever ran between the two calls
    second, _ = create_model(f"hf:{folders['clip']}", "none", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
    other, _ = create_model(f"hf:{folders['clip']}", "none", seed=4)
    assert not torch.equal(first.text_projection.weight, other.text_projection.weight)
