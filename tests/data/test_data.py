import json

import numpy as np
import pytest
import torch
from PIL import Image

from skipkernels.data import synthetic
from skipkernels.data.coop import STANDARD_DATASETS, DatasetError, load_splits
from skipkernels.data.fewshot import base_new_labels, sample_few_shot, subset_classes
from skipkernels.data.images import (EvalTransform, ImageReadError, ItemDataset, TrainTransform, epoch_batches,
                                     load_rgb)


def _write_dataset(folder, classes=("cat", "dog", "bird", "fish", "frog"), per_class=6, name="Custom"):
    images = folder / "images"
    entries = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        (images / cls).mkdir(parents=True, exist_ok=True)
        for part in entries:
            for n in range(per_class):
                rel = f"{cls}/{part}_{n}.png"
                pixels = np.random.default_rng(label * 100 + n).integers(0, 255, (24, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(images / rel)
                entries[part].append([rel, label, cls])
    (folder / f"split_zhou_{name}.json").write_text(json.dumps(entries))
    return folder


def test_synthetic_is_deterministic_and_in_coop_layout(tmp_path):
    a = synthetic.ensure_synthetic(tmp_path / "a")
    b = synthetic.ensure_synthetic(tmp_path / "b")
    sa, sb = load_splits(a, "synthetic"), load_splits(b, "synthetic")
    assert sa.classnames == synthetic.classnames() and len(sa.classnames) >= 10
    assert len(sa.train) == 12 * synthetic.SPLIT_COUNTS["train"]
    for x, y in zip(sa.train[:5], sb.train[:5]):
        assert (x.label, x.classname) == (y.label, y.classname)
        assert Image.open(x.path).tobytes() == Image.open(y.path).tobytes()
    # Both halves of the base-to-new split contain every colour and every shape.
    base, new = base_new_labels(12)
    for half in (base, new):
        names = [sa.classnames[i] for i in half]
        assert {n.split()[0] for n in names} == set(synthetic.COLOURS)
        assert {n.split()[1] for n in names} == {"circle", "square", "triangle"}
    # a second call reuses the folder
    assert synthetic.ensure_synthetic(tmp_path / "a") == a


def test_generic_folder_and_standard_names(tmp_path):
    folder = _write_dataset(tmp_path / "mydata")
    splits = load_splits(folder)
    assert splits.classnames == ["cat", "dog", "bird", "fish", "frog"]
    assert len(splits.train) == 30 and splits.train[0].path.endswith("cat/train_0.png")
    assert set(STANDARD_DATASETS) >= {"imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers",
                                      "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"}
    dtd = _write_dataset(tmp_path / "root" / "dtd", name="DescribableTextures")
    assert load_splits(tmp_path / "root", "dtd").classnames[0] == "cat"
    assert dtd.exists()


def test_imagenet_and_aircraft_readers(tmp_path):
    root = tmp_path / "imagenet"
    for part in ("train", "val"):
        for wnid in ("n01", "n02"):
            (root / "images" / part / wnid).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / "images" / part / wnid / "a.jpg")
    (root / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    splits = load_splits(tmp_path, "imagenet")
    assert splits.classnames == ["tench", "goldfish"] and len(splits.test) == 2
    air = tmp_path / "fgvc_aircraft"
    (air / "images").mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    for part in ("train", "val", "test"):
        (air / f"images_variant_{part}.txt").write_text("0001 707-320\n0002 A300B4\n")
    splits = load_splits(tmp_path, "fgvc_aircraft")
    assert splits.classnames == ["707-320", "A300B4"] and splits.train[1].label == 1


def test_bad_dataset_folders_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_splits(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="exactly one split_zhou"):
        load_splits(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "split_zhou_X.json").write_text("{not json")
    with pytest.raises(DatasetError, match="malformed split file"):
        load_splits(bad)
    (bad / "split_zhou_X.json").write_text(json.dumps({"train": [["a.png", "zero", "cat"]], "val": [], "test": []}))
    with pytest.raises(DatasetError, match="must be \\[path, int label, classname\\]"):
        load_splits(bad)
    (bad / "split_zhou_X.json").write_text(json.dumps({"train": [["a.png", 0, "cat"], ["b.png", 0, "dog"]],
                                                       "val": [], "test": []}))
    with pytest.raises(DatasetError, match="named both"):
        load_splits(bad)
    (bad / "split_zhou_X.json").write_text(json.dumps({"train": [["a.png", 0, "cat"], ["b.png", 2, "dog"]],
                                                       "val": [], "test": []}))
    with pytest.raises(DatasetError, match="without gaps"):
        load_splits(bad)


def test_few_shot_sampling_and_base_to_new(tmp_path):
    splits = load_splits(_write_dataset(tmp_path / "d"))
    a = sample_few_shot(splits.train, 4, seed=1)
    b = sample_few_shot(splits.train, 4, seed=1)
    c = sample_few_shot(splits.train, 4, seed=2)
    assert a == b and a != c
    assert all(sum(1 for it in a if it.label == lab) == 4 for lab in range(5))
    with pytest.raises(DatasetError, match="fewer than the 7 shots"):
        sample_few_shot(splits.train, 7, seed=1)
    base, new = base_new_labels(5)
    assert base == [0, 1, 2] and new == [3, 4]
    test_new = subset_classes(splits.test, new)
    assert {it.label for it in test_new} == {0, 1} and {it.classname for it in test_new} == {"fish", "frog"}


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_rgb(str(path))
    with pytest.raises(ImageReadError, match="not found"):
        load_rgb(str(tmp_path / "nope.png"))


def test_augmentation_is_deterministic_per_epoch(tmp_path):
    splits = load_splits(_write_dataset(tmp_path / "d"))
    ds = ItemDataset(splits.train, TrainTransform(16, (0.5,) * 3, (0.25,) * 3), seed=3)
    first = ds[2][0]
    assert first.shape == (3, 16, 16)
    assert torch.equal(first, ds[2][0])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[2][0])
    out = EvalTransform(16, (0.5,) * 3, (0.25,) * 3)(Image.new("RGB", (30, 20), (10, 200, 30)))
    assert out.shape == (3, 16, 16)


def test_epoch_batches_same_class_and_mixed():
    labels = [0] * 8 + [1] * 8 + [2] * 5
    batches = epoch_batches(labels, 4, same_class=True, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(21))
    assert all(len({labels[i] for i in b}) == 1 for b in batches)
    mixed = epoch_batches(labels, 4, same_class=False, seed=0, epoch=0)
    assert any(len({labels[i] for i in b}) > 1 for b in mixed)
    assert epoch_batches(labels, 4, True, 0, 1) != batches
    assert epoch_batches(labels, 4, True, 0, 0) == batches
