"""What the data, ``eval`` and ``predict`` promise holds on every seed and with every flag: eval of a
run tests on the run's held-out images, unreadable images give the same outcome whatever the seed,
folders in CoOp's layout are told apart from image folders, and each refusal says what to pass."""
import argparse
import json
import shutil
import warnings

import pytest

import reproduce_data
from skipkernels.cli import _weights_note, main
from skipkernels.data.coop import DatasetError, load_splits
from skipkernels.data.fewshot import sample_few_shot
from skipkernels.data.images import is_readable
from skipkernels.prediction import load_classifier
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.evaluate import eval_data
from skipkernels.train.job import finetune
from skipkernels.train.trainer import TrainConfig
from image_folders import make_image_folder

CLASSES = ("ant", "bee", "cow", "dog")
FAST = dict(epochs=1, shots=2, batch_size=2, lr=3e-3, lr_image=3e-3, same_class_batches=False, warmup_epochs=0,
            progress=False)


def _finetune(folder, out, base_to_new=True, mode="skip"):
    finetune(folder, None, "skipkernels-tiny", skip=SkipConfig(mode=mode, skip_layers=2), train=TrainConfig(**FAST),
             out_dir=out, base_to_new=base_to_new)
    return json.loads((out / "results.json").read_text())


def _cli(capsys, *argv):
    capsys.readouterr()
    code = main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _paths(items):
    return {it.path for it in items}


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    """An image folder and finished runs on it (2 shots, seed 1): Skip Tuning base-to-new and on all
    classes, and CoOp."""
    root = tmp_path_factory.mktemp("pics")
    folder = make_image_folder(root / "pics", classes=CLASSES, per_class=6)
    runs = {"base2new": root / "run", "all": root / "run_all", "coop": root / "run_coop"}
    results = {name: _finetune(folder, out, base_to_new=name != "all", mode="coop" if name == "coop" else "skip")
               for name, out in runs.items()}
    return folder, runs, results


# ------------------------------------------------------------------ eval of a run: its own split
@pytest.mark.parametrize("extra,checkpoint,message", [
    ([], "folder", None),
    ([], "model.pt", None),
    (["--seed", "1", "--shots", "2"], "folder", None),  # the run's own values
    (["--seed", "5"], "folder", "--seed 5 draws another split"),
    (["--shots", "3"], "folder", "--shots 3 draws another split"),
    (["--seed", "5"], "model.pt", "--seed 5 draws another split"),
])
def test_eval_of_a_run_tests_on_its_held_out_images(extra, checkpoint, message, pics, capsys):
    folder, runs, results = pics
    run = runs["base2new"]
    trained = _paths(load_splits(run / "split_zhou_pics.json").train)
    if "--seed" in extra and message is not None:  # the refusal guards a real fault: that split tests on
        assert _paths(load_splits(folder, shots=2, seed=5).test) & trained  # training images
    target = run if checkpoint == "folder" else run / "model.pt"
    code, out, err = _cli(capsys, "eval", "--data", str(folder), "--checkpoint", str(target), *extra)
    if message is None:
        assert code == 0, err
        assert json.loads(out) == pytest.approx(results["base2new"]["accuracy"], abs=1e-9)
    else:
        assert code == 2
        assert message in err and f"{run} was trained on {folder} with --shots 2 --seed 1" in err
        assert "leave out --shots and --seed" in err


def test_eval_through_another_path_to_the_runs_folder(pics, tmp_path, capsys):
    folder, runs, results = pics
    link = tmp_path / "same_pics"
    link.symlink_to(folder, target_is_directory=True)
    code, _, err = _cli(capsys, "eval", "--data", str(link), "--checkpoint", str(runs["base2new"]), "--seed", "5")
    assert code == 2 and "--seed 5 draws another split" in err
    code, out, err = _cli(capsys, "eval", "--data", str(link), "--checkpoint", str(runs["base2new"]))
    assert code == 0 and "holds the training images of" in err
    assert json.loads(out) == pytest.approx(results["base2new"]["accuracy"], abs=1e-9)


def test_eval_on_another_folder_draws_the_split_asked_for(pics, tmp_path, capsys):
    folder, runs, _ = pics
    other = make_image_folder(tmp_path / "other", classes=CLASSES, per_class=6)
    chosen = eval_data(other, None, None, 5, json.loads((runs["base2new"] / "results.json").read_text()),
                       runs["base2new"])
    assert not chosen.own and chosen.splits.test == load_splits(other, shots=2, seed=5).test
    code, out, err = _cli(capsys, "eval", "--data", str(other), "--checkpoint", str(runs["base2new"]), "--seed", "5")
    assert code == 0, err
    assert set(json.loads(out)) == {"base", "new", "hm"}


def test_eval_keeps_the_runs_split_when_images_are_added(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "pics", classes=CLASSES, per_class=6)
    run = tmp_path / "run"
    results = _finetune(folder, run)
    ran = load_splits(run / "split_zhou_pics.json")
    for cls in CLASSES:  # more images after the run: drawn again, the same seed gives another split
        for n in range(6, 10):
            shutil.copyfile(folder / cls / "img_0.png", folder / cls / f"img_{n}.png")
    assert _paths(load_splits(folder, shots=2, seed=1).test) & _paths(ran.train)
    chosen = eval_data(folder, None, run=results, run_dir=run)
    assert chosen.own and chosen.splits.test == ran.test
    code, out, err = _cli(capsys, "eval", "--data", str(folder), "--checkpoint", str(run))
    assert code == 0, err
    assert json.loads(out) == pytest.approx(results["accuracy"], abs=1e-9)
    # without the run's split file the split drawn now is not the one the run was tested on: refused
    (run / "split_zhou_pics.json").unlink()
    code, _, err = _cli(capsys, "eval", "--data", str(folder), "--checkpoint", str(run))
    assert code == 2 and f"the base test images of {folder} are not those {run} was tested on" in err


@pytest.mark.parametrize("classes,code,message", [
    (None, 0, None),
    ("all", 0, None),
    ("base", 0, None),
    ("new", 2, "was trained on all classes"),
    ("base2new", 2, "none of them is new to it: use --classes all"),
])
def test_a_run_on_all_classes_has_no_new_classes_on_its_data(classes, code, message, pics, capsys):
    folder, runs, results = pics
    extra = ["--classes", classes] if classes else []
    got, out, err = _cli(capsys, "eval", "--data", str(folder), "--checkpoint", str(runs["all"]), *extra)
    assert got == code, err
    if code == 0:
        accuracy = json.loads(out)
        assert set(accuracy) == {classes or "all"}
        if classes in (None, "all"):
            assert accuracy == pytest.approx(results["all"]["accuracy"], abs=1e-9)
    else:
        assert message in err


def test_eval_notes_what_it_cannot_know_or_change(pics, synthetic_root, tmp_path, capsys):
    folder, runs, _ = pics
    alone = tmp_path / "model.pt"
    shutil.copyfile(runs["base2new"] / "model.pt", alone)  # no results.json beside it
    code, _, err = _cli(capsys, "eval", "--data", str(folder), "--checkpoint", str(alone), "--model",
                        "skipkernels-tiny", "--shots", "2")
    assert code == 0, err
    assert "has no results.json beside it, so its run's split is unknown" in err and "--shots 2 --seed 1" in err
    code, _, err = _cli(capsys, "eval", "--data", str(synthetic_root), "--dataset", "synthetic", "--model",
                        "skipkernels-tiny-shapes", "--seed", "3")
    assert code == 0, err
    assert "brings its own split: --seed changes nothing" in err


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_checkpoint_and_pretrained_together_are_refused(command, pics, capsys):
    folder, runs, _ = pics
    inputs = ["--data", str(folder)] if command == "eval" else [str(folder / "ant"), "--classes", "ant,bee"]
    code, _, err = _cli(capsys, command, *inputs, "--checkpoint", str(runs["base2new"]), "--pretrained", "none")
    assert code == 2
    assert "both give the weights: give --checkpoint for a tuned model, or --pretrained" in err
    with pytest.raises(ValueError, match="give either checkpoint .* or pretrained .*, not both"):
        load_classifier(["ant", "bee"], checkpoint=str(runs["base2new"]), pretrained="none")


@pytest.mark.parametrize("run,code,message", [
    ("base2new", 0, None),  # the run's template is a default that --template overrides
    ("coop", 2, "a CoOp model has no template to change"),
])
def test_template_with_a_run_folder_is_used_or_refused(run, code, message, pics, tmp_path, capsys):
    folder, runs, _ = pics
    predict = ["predict", str(folder / "ant"), "--checkpoint", str(runs[run]), "--top-k", "4"]
    got, _, err = _cli(capsys, *predict, "--template", "a picture of a {}.", "--out", str(tmp_path / "t.json"))
    assert got == code, err
    if code == 0:
        assert _cli(capsys, *predict, "--out", str(tmp_path / "run.json"))[0] == 0
        with_template, as_run = (json.loads((tmp_path / name).read_text()) for name in ("t.json", "run.json"))
        assert len(with_template) == 6 and {e["class"] for e in with_template[0]["top"]} == set(CLASSES)
        assert with_template[0]["top"] != as_run[0]["top"]  # other prompts, other probabilities
    else:
        assert message in err and not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------ unreadable images, every seed
def _broken_folder(root, broken):
    """Two classes of 10 images; ``broken`` of the first class's files hold garbage."""
    folder = make_image_folder(root / "pics", classes=("ant", "bee"), per_class=10)
    names = [f"img_{n}.png" for n in (3, 7, 1)[:broken]]
    for name in names:
        (folder / "ant" / name).write_bytes(b"\x89PNG garbage")
    return folder, names


@pytest.mark.parametrize("broken", [1, 2])
def test_unreadable_images_give_the_same_outcome_on_every_seed(broken, tmp_path):
    """8 shots need 9 readable images a class (one is kept to test): one unreadable file leaves 9,
    two leave 8. The outcome must not depend on where the seed puts the unreadable files."""
    folder, names = _broken_folder(tmp_path, broken)
    outcomes = []
    for seed in range(1, 7):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                splits = load_splits(folder, shots=8, seed=seed)
                train = sample_few_shot(splits.train, 8, seed, readable=is_readable)
            except DatasetError as err:
                outcomes.append(str(err))
                continue
        assert [str(w.message) for w in caught] == [f"{folder}: left out 1 unreadable images, the split is drawn "
                                                    "from the readable ones: ant/img_3.png"]
        assert {it.path.rsplit("/", 1)[1] for it in splits.train + splits.val + splits.test
                if "/ant/" in it.path}.isdisjoint(names)
        assert [sum(it.label == label for it in train) for label in (0, 1)] == [8, 8]
        outcomes.append("works")
    if broken == 1:
        assert outcomes == ["works"] * 6
    else:
        assert len(set(outcomes)) == 1, outcomes  # the same message for every seed
        assert "ant has 8 readable images, fewer than the 9 needed for 8 shots" in outcomes[0]
        assert "unreadable: img_3.png, img_7.png" in outcomes[0]


def test_finetune_refuses_too_few_readable_images_before_any_work(tmp_path, capsys):
    folder, _ = _broken_folder(tmp_path, 2)
    errors = set()
    for seed in ("1", "2", "3"):
        code, _, err = _cli(capsys, "finetune", "--data", str(folder), "--model", "skipkernels-tiny", "--shots", "8",
                            "--seed", seed, "--epochs", "1", "--out", str(tmp_path / f"run{seed}"))
        assert code == 2
        errors.add(err.strip().splitlines()[-1])
        assert not (tmp_path / f"run{seed}").exists()
    error = errors.pop()
    assert not errors and error.startswith(f"skipkernels finetune: error: class folder {folder / 'ant'} has 8 readable")
    assert error.endswith("; unreadable: img_3.png, img_7.png")


# ------------------------------------------------------------------ CoOp folders and dataset names
@pytest.mark.parametrize("layout", ["eurosat_folder", "eurosat_split_file"])
def test_a_coop_dataset_folder_reads_without_its_name(layout, tmp_path):
    """EuroSAT's images are in its ``2750/``: found from the split file's name (or by looking)."""
    folder = reproduce_data.coop_dataset(tmp_path, "eurosat")
    data = folder if layout == "eurosat_folder" else folder / "split_zhou_EuroSAT.json"
    splits = load_splits(data)
    named = load_splits(tmp_path, "eurosat")
    assert splits.classnames == named.classnames and len(splits.train) == len(named.train) == 8
    assert [it.path for it in splits.test] == [it.path for it in named.test]
    assert all(is_readable(it) for it in splits.train + splits.test)


@pytest.mark.parametrize("case,message", [
    ("coop_root", "holds datasets in CoOp's layout, not class folders: pass --dataset with one of dtd, eurosat"),
    ("imagenet_folder", "is CoOp's imagenet folder, not a folder of class folders: pass --data {root} "
                        "--dataset imagenet"),
    ("images_elsewhere", "the images of {root}/mine/split_zhou_Mine.json are not found"),
    ("unknown_name", "unknown dataset 'foo': neither a known name (caltech101, dtd, eurosat"),
    ("known_name_missing", "dataset folder not found: {root}/oxford_pets"),
    ("name_of_the_folder_given", "{root}/eurosat is the eurosat folder itself, and --dataset looks for it under "
                                 "--data: pass --data {root} --dataset eurosat, or --data {root}/eurosat alone"),
    ("name_of_the_file_given", "is a file, and --dataset names a folder under a data root: leave --dataset out"),
])
def test_dataset_folders_that_are_not_what_was_asked_say_what_to_pass(case, message, tmp_path, capsys):
    reproduce_data.coop_dataset(tmp_path, "eurosat")
    reproduce_data.coop_dataset(tmp_path, "dtd")
    data, dataset = tmp_path, None
    if case == "imagenet_folder":
        data = reproduce_data.imagenet(tmp_path)
    elif case == "images_elsewhere":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "split_zhou_Mine.json").write_text(json.dumps(
            {"train": [["a/1.png", 0, "a"]], "val": [], "test": [["b/1.png", 1, "b"]]}))
        data = tmp_path / "mine"
    elif case == "unknown_name":
        dataset = "foo"
    elif case == "known_name_missing":
        dataset = "oxford_pets"
    elif case == "name_of_the_folder_given":
        data, dataset = tmp_path / "eurosat", "eurosat"
    elif case == "name_of_the_file_given":
        data, dataset = tmp_path / "eurosat" / "split_zhou_EuroSAT.json", "eurosat"
    message = message.format(root=tmp_path)
    with pytest.raises(DatasetError) as raised:
        load_splits(data, dataset)
    assert message in str(raised.value)
    code, _, err = _cli(capsys, "eval", "--data", str(data), *(["--dataset", dataset] if dataset else []),
                        "--model", "skipkernels-tiny-shapes")
    assert code == 2 and err.startswith("skipkernels eval: error: ") and message in err


def test_a_folder_under_the_root_is_read_by_its_name(tmp_path):
    make_image_folder(tmp_path / "mine", classes=("ant", "bee"), per_class=3)
    assert load_splits(tmp_path, "mine", shots=1, seed=1).classnames == ["ant", "bee"]


# ------------------------------------------------------------------ predict: unreadable images, notes
@pytest.mark.parametrize("broken,code", [(1, 0), (2, 2)])
def test_predict_counts_unreadable_images_and_fails_when_none_is_read(broken, code, tmp_path, capsys):
    make_image_folder(tmp_path / "pics", classes=("ant",), per_class=1)
    images = [tmp_path / "pics" / "ant" / "img_0.png", tmp_path / "bad_1.png"]
    for n in range(broken):
        images[-1 - n] = tmp_path / f"bad_{n}.png"
        images[-1 - n].write_bytes(b"not an image at all")
    out = tmp_path / "p.csv"
    got, printed, err = _cli(capsys, "predict", *map(str, images), "--classes", "ant,bee", "--model",
                             "skipkernels-tiny-shapes", "--out", str(out))
    assert got == code
    assert "UserWarning" not in err and ".py:" not in err  # one plain line, not the warning's source line
    if code == 0:
        assert f"skipkernels predict: warning: skipped 1 of the 2 images, unreadable: {images[1]}\n" in err
        rows = out.read_text().splitlines()
        assert rows[0] == "image,rank,class,probability" and {r.split(",")[0] for r in rows[1:]} == {str(images[0])}
    else:
        assert "skipkernels predict: error: none of the 2 images could be read" in err
        assert str(images[0]) in err and str(images[1]) in err
        assert not out.exists() and "saved" not in printed


def test_eval_says_skipped_test_images_in_one_plain_line(tmp_path, capsys):
    folder = reproduce_data.coop_dataset(tmp_path, "dtd")
    broken = load_splits(tmp_path, "dtd").test[0]
    with open(broken.path, "wb") as f:
        f.write(b"garbage")
    code, out, err = _cli(capsys, "eval", "--data", str(tmp_path), "--dataset", "dtd", "--model",
                          "skipkernels-tiny-shapes", "--classes", "base")
    assert code == 0, err
    assert "skipkernels eval: warning: eval base: skipped 1 unreadable test images; accuracy is over the 3 readable" \
        in err
    assert "UserWarning" not in err and ".py:" not in err
    assert folder.exists() and set(json.loads(out)) == {"base"}


@pytest.mark.parametrize("model,checkpoint,pretrained,note", [
    ("ViT-B-16", None, None, "note: neither --checkpoint nor --pretrained given: ViT-B-16 has random weights"),
    (None, None, None, "note: neither --checkpoint nor --pretrained given: ViT-B-16 has random weights"),
    ("skipkernels-tiny", None, None, "skipkernels-tiny has random weights"),
    ("skipkernels-tiny-shapes", None, None, None),  # its shipped weights
    ("hf:/models/clip-folder", None, None, None),  # the folder's own weights
    ("hf:/models/clip-folder", None, "none", "note: --pretrained none: hf:/models/clip-folder has random weights"),
    ("skipkernels-tiny-shapes", None, "none", "note: --pretrained none: skipkernels-tiny-shapes has random weights"),
    ("ViT-B-16", None, "/weights/ViT-B-16.pt", None),
    ("ViT-B-16", None, "openai", None),
    ("ViT-B-16", "runs/pets", None, None),
])
def test_the_random_weights_note_is_true(model, checkpoint, pretrained, note, capsys):
    _weights_note(argparse.Namespace(model=model, checkpoint=checkpoint, pretrained=pretrained))
    err = capsys.readouterr().err
    if note is None:
        assert err == ""
    else:
        assert note in err and err.count("\n") == 1
