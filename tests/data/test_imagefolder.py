"""Plain image folders (``DIR/<class>/*.png``): seeded splits, written split files, clear errors."""
import json

import pytest
from PIL import Image

from image_folders import make_image_folder
from skipkernels.cli import main
from skipkernels.data.coop import DatasetError, load_splits, write_split_json
from skipkernels.data.fewshot import base_new_labels, sample_few_shot
from skipkernels.data.images import is_readable


def _paths(items):
    return [it.path for it in items]


def test_labels_follow_sorted_folders_and_names_drop_underscores(tmp_path):
    splits = load_splits(make_image_folder(tmp_path / "pics"), shots=3, seed=1)
    assert splits.generated and splits.name == "pics"
    assert splits.classnames == ["apple tree", "bird", "cat", "dog", "zebra"]
    for part in (splits.train, splits.val, splits.test):
        assert all(it.classname == splits.classnames[it.label] for it in part)
        assert all(f"/{it.classname.replace(' ', '_')}/" in it.path for it in part)
    # 7 images a class: 3 to train, min(3, 4, (7 - 3) // 2) = 2 to validate, 2 to test
    for label in range(5):
        counts = [sum(it.label == label for it in part) for part in (splits.train, splits.val, splits.test)]
        assert counts == [3, 2, 2]
    assert not set(_paths(splits.train)) & set(_paths(splits.test))
    assert not set(_paths(splits.val)) & (set(_paths(splits.train)) | set(_paths(splits.test)))
    # base = the first ceil(5/2) = 3 sorted labels, the CoOp rule
    assert [splits.classnames[i] for i in base_new_labels(5)[0]] == ["apple tree", "bird", "cat"]


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    folder = make_image_folder(tmp_path / "pics", per_class=12)
    a, b = load_splits(folder, shots=4, seed=3), load_splits(folder, shots=4, seed=3)
    c = load_splits(folder, shots=4, seed=4)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert _paths(a.train) != _paths(c.train)


def test_all_images_keep_a_fifth_to_test(tmp_path):
    splits = load_splits(make_image_folder(tmp_path / "pics", classes=("a", "b"), per_class=10), shots=0, seed=1)
    assert [sum(it.label == 0 for it in part) for part in (splits.train, splits.val, splits.test)] == [7, 1, 2]


def test_classnames_file_gives_display_names(tmp_path):
    folder = make_image_folder(tmp_path / "pics", classes=("n01", "n02"), per_class=3)
    (folder / "classnames.txt").write_text("n01 golden retriever\nn02 tabby cat\n")
    assert load_splits(folder, shots=1, seed=1).classnames == ["golden retriever", "tabby cat"]
    (folder / "classnames.txt").write_text("n01 golden retriever\n")
    with pytest.raises(DatasetError, match=r"no name for \['n02'\]"):
        load_splits(folder, shots=1, seed=1)


def test_written_split_reads_back_identically(tmp_path):
    splits = load_splits(make_image_folder(tmp_path / "pics"), shots=2, seed=1)
    path = tmp_path / "run" / "split_zhou_pics.json"
    write_split_json(splits, path)
    assert set(json.loads(path.read_text())) == {"train", "val", "test"}
    again = load_splits(path)
    assert not again.generated and again.name == "pics" and again.classnames == splits.classnames
    assert (again.train, again.val, again.test) == (splits.train, splits.val, splits.test)
    assert load_splits(path.parent).train == splits.train  # the folder holding it works too


@pytest.mark.parametrize("breakage,message", [
    ("missing", "dataset folder not found"),
    ("no_classes", "found none, or class folders .*pics/<class name>/<images>"),
    ("one_class", "has one class folder"),
    ("empty_class", "class folder .*empty_one has no images"),
    ("few_images", "has 3 images, fewer than the 5 needed for 4 shots"),
    ("unreadable", "dog has 0 readable images, fewer than the 5 needed for 4 shots .*unreadable: img_0.png"),
])
def test_bad_image_folders_raise_clear_errors(breakage, message, tmp_path):
    folder = tmp_path / "pics"
    if breakage == "no_classes":
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "loose.png")
    elif breakage == "one_class":
        make_image_folder(folder, classes=("cat",), per_class=6)
    elif breakage != "missing":
        make_image_folder(folder, per_class=6)
    if breakage == "empty_class":
        (folder / "empty_one").mkdir()
        (folder / "empty_one" / "notes.txt").write_text("not an image")
    elif breakage == "few_images":
        for extra in ("img_3.png", "img_4.png", "img_5.png"):
            (folder / "dog" / extra).unlink()
    elif breakage == "unreadable":
        for image in (folder / "dog").iterdir():
            image.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=message):
        sample_few_shot(load_splits(folder, shots=4, seed=1).train, 4, seed=1, readable=is_readable)


def test_finetune_on_an_image_folder_writes_its_split(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "pics", classes=("ant", "bee", "cow", "dog"), per_class=6)
    out = tmp_path / "run"
    args = ["finetune", "--data", str(folder), "--model", "skipkernels-tiny", "--mode", "skip", "--skip-layers", "2",
            "--epochs", "1", "--shots", "2", "--batch-size", "2", "--lr", "0.003", "--no-progress"]
    assert main(args + ["--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "pics" and results["base_classes"] == 2 and results["new_classes"] == 2
    split_file = out / "split_zhou_pics.json"
    assert len(json.loads(split_file.read_text())["train"]) == 4 * 2
    # repeating the run from the written split gives the same training run
    assert main(args + ["--data", str(split_file), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["history"] == results["history"] and again["accuracy"] == results["accuracy"]
    # and on to predictions: the run folder brings its model and its classes
    capsys.readouterr()
    assert main(["predict", str(folder / "cow"), "--checkpoint", str(out), "--top-k", "4",
                 "--out", str(tmp_path / "cow.json"), "--no-progress"]) == 0
    predicted = json.loads((tmp_path / "cow.json").read_text())
    assert len(predicted) == 6 and {e["class"] for e in predicted[0]["top"]} == {"ant", "bee", "cow", "dog"}
    capsys.readouterr()
    assert main(args[:2] + [str(tmp_path / "nowhere")] + args[3:] + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "dataset folder not found" in err and "Traceback" not in err


def test_finetune_on_an_image_folder_with_default_flags(tmp_path, capsys):
    """`skipkernels finetune --data pics --model skipkernels-tiny`: every setting its default (the
    paper's 16 shots, 20 epochs, batch 4; omega half of the tiny model's 4 blocks)."""
    import torch
    from skipkernels.models import create_model
    folder = make_image_folder(tmp_path / "pics", classes=("ant", "bee", "cow", "dog"), per_class=17)
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(folder), "--model", "skipkernels-tiny", "--out", str(out),
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] and results["skip_config"]["skip_layers"] == 2
    assert len(results["history"]) == 20 and set(results["accuracy"]) == {"base", "new", "hm"}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 20 * (2 * 16 // 4)  # header, then 20 epochs of 2 base classes x 16 shots / 4
    # It trained: blocks >= omega moved from the initial weights, blocks below it are frozen.
    initial = create_model("skipkernels-tiny", None, seed=0)[0].state_dict()
    tuned = torch.load(out / "model.pt", map_location="cpu")
    for tower in ("visual.transformer", "transformer"):
        frozen, trained = (f"{tower}.resblocks.{i}.mlp.c_fc.weight" for i in (1, 2))
        assert torch.equal(tuned[frozen], initial[frozen])
        assert not torch.equal(tuned[trained], initial[trained])
