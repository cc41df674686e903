"""``skipkernels predict``: top-k classes of images, checked against open_clip computed directly."""
import json

import pytest
import torch

from conftest import tiny_runs

from skipkernels.cli import main
from skipkernels.data import synthetic
from skipkernels.data.coop import load_splits
from skipkernels.data.fewshot import base_new_labels
from skipkernels.data.images import EvalTransform, load_rgb, preprocess_config
from skipkernels.prediction import load_classifier, predict
from skipkernels.train.evaluate import class_group

FAST = dict(batch_size=8, lr=3e-3, lr_image=3e-3, shots=8, same_class_batches=False, warmup_epochs=0,
            progress=False)


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """One-epoch runs of the tiny model: plain Skip Tuning, an adapter (pet.pt), LoRA (folded into
    model.pt) and CoOp."""
    return tiny_runs(synthetic_root, tmp_path_factory, ("skip", "lskip-adapter", "lskip-lora", "coop"), **FAST)


def _test_images(synthetic_root, count):
    return [it.path for it in load_splits(synthetic_root, "synthetic").test[::16][:count]]


def test_predictions_match_open_clip_computed_directly(runs, synthetic_root, tmp_path, capsys, open_clip):
    images = _test_images(synthetic_root, 5)
    names = synthetic.classnames()
    assert main(["predict", *images, "--classes", ",".join(names), "--model", "skipkernels-tiny",
                 "--checkpoint", str(runs["skip"] / "model.pt"), "--top-k", str(len(names)), "--batch-size", "2",
                 "--out", str(tmp_path / "p.json"), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "top 1" in printed and images[0] in printed
    saved = json.loads((tmp_path / "p.json").read_text())
    assert [row["image"] for row in saved] == images

    # the same numbers from an unpatched open_clip model loaded from model.pt
    model = open_clip.create_model("skipkernels-tiny", pretrained=str(runs["skip"] / "model.pt")).eval()
    tokenizer = open_clip.get_tokenizer("skipkernels-tiny")
    transform = EvalTransform(*preprocess_config(model))
    with torch.no_grad():
        f = model.encode_image(torch.stack([transform(load_rgb(p)) for p in images]), normalize=True)
        t = model.encode_text(tokenizer([f"a photo of a {c}." for c in names]), normalize=True)
        expected = (model.logit_scale.exp() * f @ t.T).softmax(-1)
    for row, probs in zip(saved, expected):
        got = {entry["class"]: entry["probability"] for entry in row["top"]}
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
        assert row["top"][0]["class"] == names[int(probs.argmax())]
        assert [got[c] for c in names] == pytest.approx(probs.tolist(), abs=1e-4)
        assert [e["probability"] for e in row["top"]] == sorted(got.values(), reverse=True)
    csv_lines = (tmp_path / "p.csv").read_text().splitlines()
    assert csv_lines[0] == "image,rank,class,probability" and len(csv_lines) == 1 + len(images) * len(names)


@pytest.mark.parametrize("mode", ["skip", "lskip-adapter", "lskip-lora", "coop"])
def test_run_folder_predictions_reproduce_the_runs_accuracy(mode, runs, synthetic_root):
    """A finetune folder brings its PET modules (pet.pt; LoRA is already in model.pt) or CoOp
    context (prompt_learner.pt): top-1 over the base test images gives the trainer's accuracy."""
    splits = load_splits(synthetic_root, "synthetic")
    items, names = class_group(splits.test, splits.classnames, base_new_labels(len(splits.classnames))[0])
    tuner = load_classifier(names, checkpoint=str(runs[mode]))
    assert (tuner.pet is not None) == (mode == "lskip-adapter")
    assert (tuner.prompt_learner is not None) == (mode == "coop")
    predictions = predict(tuner, [it.path for it in items], names, top_k=2, progress=False)
    correct = sum(p.top[0][0] == it.classname for p, it in zip(predictions, items))
    reported = json.loads((runs[mode] / "results.json").read_text())["accuracy"]["base"]
    assert 100.0 * correct / len(items) == pytest.approx(reported)


def test_classes_from_a_file_and_images_from_a_folder(runs, synthetic_root, tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("red circle\n\ngreen square\nblue triangle\n")
    folder = synthetic_root / "synthetic" / "images" / "red_circle"
    assert main(["predict", str(folder), "--classes", str(tmp_path / "classes.txt"), "--checkpoint",
                 str(runs["skip"]), "--top-k", "2", "--out", str(tmp_path / "p.json"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "p.json").read_text())
    assert len(saved) == len(list(folder.glob("*.png"))) and all(len(row["top"]) == 2 for row in saved)
    assert f"... and {len(saved) - 20} more images" in capsys.readouterr().out  # the file holds them all
    assert {e["class"] for row in saved for e in row["top"]} <= {"red circle", "green square", "blue triangle"}
    capsys.readouterr()
    assert main(["predict", str(folder), "--classes", "a,b", "--checkpoint", str(runs["skip"]), "--model", "ViT-B-16",
                 "--no-progress"]) == 2
    assert "differs from the model skipkernels-tiny" in capsys.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("missing_classes", "class file not found"),
    ("empty_classes", "lists no classes"),
    ("one_class", "at least two classes"),
    ("missing_image", "no such image or folder"),
    ("empty_folder", "no images"),
    ("bad_out", "must end in .csv or .json"),
    ("not_a_run", "not a finetune output folder"),
    ("missing_weights", "pretrained checkpoint not found"),
    ("duplicate_classes", "duplicated class names"),
    ("foreign_weights", "does not hold weights of skipkernels-tiny"),
    ("cuda_missing", "CUDA is not available"),
    ("unknown_weights", "could not load weights 'no-such-tag'"),
    ("missing_run", "checkpoint not found: no-such-run"),
    ("no_classes", "--classes is needed unless --checkpoint is a finetune output folder"),
])
def test_user_mistakes_exit_cleanly(case, message, synthetic_root, tmp_path, capsys):
    image = _test_images(synthetic_root, 1)[0]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "nothing").mkdir()
    args = {"missing_classes": [image, "--classes", str(tmp_path / "nope.txt")],
            "empty_classes": [image, "--classes", str(tmp_path / "empty.txt")],
            "one_class": [image, "--classes", "cat"],
            "missing_image": [str(tmp_path / "gone.png"), "--classes", "cat,dog"],
            "empty_folder": [str(tmp_path / "nothing"), "--classes", "cat,dog"],
            "bad_out": [image, "--classes", "cat,dog", "--out", str(tmp_path / "p.txt")],
            "not_a_run": [image, "--classes", "cat,dog", "--checkpoint", str(tmp_path / "nothing")],
            "missing_weights": [image, "--classes", "cat,dog", "--pretrained", str(tmp_path / "model.pt")],
            "duplicate_classes": [image, "--classes", "cat,dog,cat"],
            "foreign_weights": [image, "--classes", "cat,dog", "--checkpoint", str(tmp_path / "foreign.pt")],
            "cuda_missing": [image, "--classes", "cat,dog", "--device", "cuda"],
            "unknown_weights": [image, "--classes", "cat,dog", "--pretrained", "no-such-tag"],
            "missing_run": [image, "--classes", "cat,dog", "--checkpoint", "no-such-run"],
            "no_classes": [image]}[case]
    if case == "cuda_missing" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    torch.save({"not_a_clip_weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert main(["predict", *args, "--model", "skipkernels-tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
