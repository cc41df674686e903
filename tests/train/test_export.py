"""``skipkernels export``: each format loads back, elsewhere, and gives the run's logits within
``export.LOGIT_TOLERANCE``; what cannot be exported exactly is refused with the reason."""
import json
import subprocess
import sys
import sysconfig

import pytest
import torch

from conftest import tiny_runs

from skipkernels import export
from skipkernels.cli import main
from skipkernels.prediction import load_classifier
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.job import finetune
from skipkernels.train.trainer import TrainConfig

FAST = dict(batch_size=8, lr=3e-3, lr_image=3e-3, shots=8, same_class_batches=False, warmup_epochs=0,
            progress=False)


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """One-epoch runs of the tiny model: plain Skip Tuning, LoRA (folded), an adapter and CoOp."""
    return tiny_runs(synthetic_root, tmp_path_factory, ("skip", "lskip-lora", "lskip-adapter", "coop"), **FAST)


def _images(count=3, seed=7):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _run_logits(run, classnames, images):
    return export.run_logits(load_classifier(classnames, checkpoint=str(run)), classnames, images)


# A fresh interpreter without site's start-up hooks (which may import skipkernels) and with
# skipkernels made unimportable: only open_clip reads the folder.
_FRESH_OPEN_CLIP = r"""
import sys, importlib.abc
sys.path.append(sys.argv[1])
class NoSkipkernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "skipkernels" or name.startswith("skipkernels."):
            raise ImportError("skipkernels is not to be imported here")
sys.meta_path.insert(0, NoSkipkernels())
import torch
try:
    import torchvision
except RuntimeError as err:  # a CUDA torchvision wheel beside a CPU torch: its two missing op schemas
    if "torchvision::nms does not exist" not in str(err):
        raise
    for name in [n for n in sys.modules if n.startswith("torchvision")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import open_clip
import torch.nn.functional as F
folder, classes, images_path, out = sys.argv[2:6]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
template = __import__("json").load(open(folder + "/provenance.json"))["template"]
with torch.no_grad():
    text = F.normalize(model.eval().encode_text(tokenizer([template.format(c) for c in classes.split(",")])), dim=-1)
    image = F.normalize(model.encode_image(torch.load(images_path)), dim=-1)
    torch.save(model.logit_scale.exp() * image @ text.T, out)
assert not [m for m in sys.modules if m.startswith("skipkernels")]
print("resize", preprocess.transforms[0].size, "crop", preprocess.transforms[1].size)
"""


@pytest.mark.parametrize("mode", ["skip", "lskip-lora"])
def test_open_clip_folder_loads_in_a_fresh_process_without_skipkernels(mode, runs, tmp_path):
    out = tmp_path / "open_clip"
    record = export.export_run(runs[mode], out, "open_clip")
    assert (out / "open_clip_config.json").is_file() and (out / export.OPEN_CLIP_WEIGHTS).is_file()
    assert record["checked_max_abs_logit_error"] <= export.LOGIT_TOLERANCE
    provenance = json.loads((out / export.PROVENANCE_NAME).read_text())
    results = json.loads((runs[mode] / "results.json").read_text())
    assert provenance["mode"] == mode and provenance["model"] == "skipkernels-tiny"
    assert provenance["classes"] == results["classnames"] and provenance["versions"]["torch"] == torch.__version__
    assert len(provenance["run_identity_sha256"]) == 64 and len(provenance["model_pt_sha256"]) == 64

    classes = results["classnames"]
    images = _images()
    torch.save(images, tmp_path / "images.pt")
    proc = subprocess.run([sys.executable, "-S", "-c", _FRESH_OPEN_CLIP, sysconfig.get_paths()["purelib"], str(out),
                           ",".join(classes), str(tmp_path / "images.pt"), str(tmp_path / "logits.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resize 32 crop (32, 32)" in proc.stdout
    logits = torch.load(tmp_path / "logits.pt")
    expected = _run_logits(runs[mode], classes, images)
    assert logits.shape == (3, len(classes))
    assert (logits - expected).abs().max() <= export.LOGIT_TOLERANCE


@pytest.mark.parametrize("mode, reason", [("lskip-adapter", "nonlinear"), ("coop", "learned context is no weight")])
def test_modes_that_do_not_fold_are_refused_with_the_reason(mode, reason, runs, tmp_path, capsys):
    with pytest.raises(export.ExportError, match=reason):
        export.export_run(runs[mode], tmp_path / "a", "open_clip")
    assert main(["export", str(runs[mode]), "--format", "open_clip", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "skipkernels export: error:" in err and reason in err and "--format classifier" in err
    assert not (tmp_path / "b" / export.OPEN_CLIP_WEIGHTS).exists()


@pytest.mark.parametrize("mode, program", [("lskip-adapter", "torch.export"), ("coop", "torchscript"),
                                           ("skip", "torch.export")])
def test_classifier_gives_the_runs_logits_eager_and_under_onnxruntime(mode, program, runs, tmp_path):
    classes = json.loads((runs[mode] / "results.json").read_text())["classnames"][:5]  # a class list of its own
    out = tmp_path / "classifier"
    record = export.export_run(runs[mode], out, "classifier", classnames=classes, program=program)
    assert record["classes"] == classes and record["program"] == program
    assert (out / "classes.txt").read_text().split("\n")[:5] == classes
    preprocess = json.loads((out / export.PREPROCESS_NAME).read_text())
    assert preprocess["size"] == 32 and preprocess["interpolation"] == "bicubic" and len(preprocess["mean"]) == 3
    images = _images(count=5)  # not the batch size it was traced with
    expected = _run_logits(runs[mode], classes, images)
    with torch.no_grad():
        logits = export.load_program(out / export.CLASSIFIER_FILES[program])(images)
    assert logits.shape == (5, 5) and (logits - expected).abs().max() <= export.LOGIT_TOLERANCE
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the export extra)")
    assert record["checked_max_abs_logit_error"]["onnxruntime"] <= export.LOGIT_TOLERANCE
    assert (export.onnx_logits(out / export.ONNX_NAME, images) - expected).abs().max() <= export.LOGIT_TOLERANCE


def test_export_command_writes_the_classifier_and_says_what_it_checked(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(runs["skip"] / "model.pt"), "--format", "classifier", "--out", str(out),
                 "--no-onnx", "--classes", "red circle,green square"]) == 0
    printed = capsys.readouterr().out
    assert f"saved: {out / 'classifier.pt2'}" in printed and "checked: largest logit difference" in printed
    assert not (out / export.ONNX_NAME).exists()
    assert json.loads((out / export.PROVENANCE_NAME).read_text())["classes"] == ["red circle", "green square"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["export", str(runs["skip"]), "--format", "classifier", "--out", str(tmp_path / "other")]) == 2
    assert "holds files that no export wrote" in capsys.readouterr().err
    assert main(["export", str(runs["skip"]), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "use --format open_clip" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_run(synthetic_root, tmp_path_factory):
    """A one-epoch Skip Tuning run of a tiny transformers CLIP, given as ``hf:<folder>``."""
    from hf_models import tiny_hf
    from hf_models import word_tokenizer as _word_tokenizer
    folder = tmp_path_factory.mktemp("hf-run")
    source = folder / "tiny-clip"
    tiny_hf("clip").save_pretrained(source)
    _word_tokenizer().save_pretrained(source)
    run = folder / "run"
    finetune(synthetic_root, "synthetic", f"hf:{source}", skip=SkipConfig(mode="skip", skip_layers=1),
             train=TrainConfig(epochs=1, **FAST), out_dir=run)
    return run


def test_hf_run_exports_with_save_pretrained(hf_run, tmp_path):
    import transformers

    run = hf_run
    out = tmp_path / "hf"
    record = export.export_run(run, out, "hf")
    assert record["checked_max_abs_logit_error"] <= export.LOGIT_TOLERANCE
    loaded = transformers.CLIPModel.from_pretrained(out)
    saved = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert transformers.AutoTokenizer.from_pretrained(out)("a photo of a red circle.")["input_ids"][0] == 998


def test_hf_run_exports_as_a_classifier_eager_and_under_onnxruntime(hf_run, tmp_path):
    """The classifier of an ``hf:`` run: its transformers image tower with the class embeddings baked in."""
    classes = json.loads((hf_run / "results.json").read_text())["classnames"][:4]
    out = tmp_path / "classifier"
    record = export.export_run(hf_run, out, "classifier", classnames=classes)
    assert record["format"] == "classifier" and record["classes"] == classes
    assert record["checked_max_abs_logit_error"]["torch.export"] <= export.LOGIT_TOLERANCE
    images = _images(count=3)  # not the batch size it was traced with
    expected = _run_logits(hf_run, classes, images)
    with torch.no_grad():
        logits = export.load_program(out / export.CLASSIFIER_FILES["torch.export"])(images)
    assert logits.shape == (3, 4) and (logits - expected).abs().max() <= export.LOGIT_TOLERANCE
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the export extra)")
    assert (export.onnx_logits(out / export.ONNX_NAME, images) - expected).abs().max() <= export.LOGIT_TOLERANCE


def test_onnx_without_its_packages_is_refused_before_any_work(runs, tmp_path, monkeypatch):
    import importlib.util
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else found(name, *a))
    with pytest.raises(export.ExportError, match=r"needs onnxscript.*skipkernels\[export\].*--no-onnx"):
        export.export_run(runs["skip"], tmp_path / "c", "classifier")
    assert not (tmp_path / "c").exists()
