"""ImageNet's test-only variants (V2, Sketch, A, R) read in CoOp's layouts, with the shipped subsets."""
import numpy as np
import pytest
from PIL import Image

from skipkernels.data.coop import STANDARD_DATASETS, DatasetError, load_splits
from skipkernels.data.imagenet_variants import VARIANTS, imagenet_wnids, subset_indices, subset_wnids


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(path)


def _classnames(folder, wnids=None):
    wnids = imagenet_wnids() if wnids is None else wnids
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} class {w}\n" for w in wnids))


def test_shipped_lists_match_the_published_subsets():
    wnids = imagenet_wnids()
    assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    for name, first_wnid, first_index in (("imagenet_a", "n01498041", 6), ("imagenet_r", "n01443537", 1)):
        idx = subset_indices(name)
        assert len(idx) == len(set(idx)) == 200 and idx == sorted(idx)
        assert (idx[0], subset_wnids(name)[0]) == (first_index, first_wnid)
        assert (idx[-1], subset_wnids(name)[-1]) == (988, "n12267677")
    # The two subsets are different sets of classes that share some.
    a, r = set(subset_indices("imagenet_a")), set(subset_indices("imagenet_r"))
    assert a != r and a & r
    with pytest.raises(ValueError, match="imagenet_a"):
        subset_indices("imagenet")


def test_every_variant_is_a_standard_name():
    assert set(VARIANTS) <= set(STANDARD_DATASETS)


def test_imagenet_a_labels_follow_imagenet_order(tmp_path):
    folder = tmp_path / "imagenet-adversarial"
    _classnames(folder)
    wnids = subset_wnids("imagenet_a")
    # Written out of order: labels must follow ImageNet's order, not the file system's.
    for w in (wnids[5], wnids[0], wnids[199]):
        _image(folder / "imagenet-a" / w / "0.jpg")
        _image(folder / "imagenet-a" / w / "1.jpg")
    with pytest.warns(UserWarning, match="3 of its 200"):
        splits = load_splits(tmp_path, "imagenet_a")
    assert splits.train == [] and splits.val == [] and len(splits.test) == 6
    assert splits.classnames == [f"class {w}" for w in (wnids[0], wnids[5], wnids[199])]
    assert [i.label for i in splits.test] == [0, 0, 1, 1, 2, 2]
    assert splits.test[0].path.endswith(f"{wnids[0]}/0.jpg")


def test_imagenet_r_refuses_a_class_outside_its_subset(tmp_path):
    folder = tmp_path / "imagenet-rendition"
    _classnames(folder)
    outside = next(w for i, w in enumerate(imagenet_wnids()) if i not in set(subset_indices("imagenet_r")))
    _image(folder / "imagenet-r" / subset_wnids("imagenet_r")[0] / "a.png")
    _image(folder / "imagenet-r" / outside / "a.png")
    with pytest.raises(DatasetError, match="not one of the 200 classes of imagenet_r"):
        load_splits(tmp_path, "imagenet_r")


def test_imagenet_v2_reads_numbered_folders(tmp_path):
    folder = tmp_path / "imagenetv2"
    _classnames(folder)
    images = folder / "imagenetv2-matched-frequency-format-val"
    for label in range(1000):
        (images / str(label)).mkdir(parents=True)
    _image(images / "0" / "x.jpeg")
    _image(images / "999" / "y.jpeg")
    splits = load_splits(tmp_path, "imagenetv2")
    assert len(splits.classnames) == 1000
    assert [(i.label, i.classname) for i in splits.test] == [(0, "class n01440764"), (999, "class n15075141")]
    (images / "17").rmdir()
    with pytest.raises(DatasetError, match="class folders missing.*17"):
        load_splits(tmp_path, "imagenetv2")


def test_imagenet_sketch_and_its_errors(tmp_path):
    folder = tmp_path / "imagenet-sketch"
    with pytest.raises(DatasetError, match="dataset folder not found"):
        load_splits(tmp_path, "imagenet_sketch")
    folder.mkdir()
    with pytest.raises(DatasetError, match="classnames.txt"):
        load_splits(tmp_path, "imagenet_sketch")
    _classnames(folder)
    with pytest.raises(DatasetError, match="image folder not found"):
        load_splits(tmp_path, "imagenet_sketch")
    _image(folder / "images" / "n01443537" / "s.JPEG")
    with pytest.warns(UserWarning, match="1 of its 1000"):
        splits = load_splits(tmp_path, "imagenet_sketch")
    assert [i.label for i in splits.test] == [0] and splits.classnames == ["class n01443537"]


@pytest.mark.parametrize("lines,message", [
    (["n01440764 tench", "n01440764 tench"], "listed twice"),
    (["n01440764"], "expected '<wnid> <class name>'"),
    ([], "lists no classes"),
    (["n01443537 goldfish", "n01440764 tench"], "not in ImageNet's label order"),
])
def test_bad_classnames_files(tmp_path, lines, message):
    folder = tmp_path / "imagenet-sketch"
    folder.mkdir()
    (folder / "classnames.txt").write_text("\n".join(lines))
    _image(folder / "images" / "n01440764" / "s.png")
    with pytest.raises(DatasetError, match=message):
        load_splits(tmp_path, "imagenet_sketch")
