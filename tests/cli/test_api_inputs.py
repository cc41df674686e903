"""Bad input to the public Python API ends in a TypeError or ValueError that names the argument
and what it needs, never in an error from inside torch (CPU; the CUDA cases are in
tests/cuda/test_cuda_api_inputs.py). Each case asserts the exception type and a word of its
message, so no case passes by raising just anything."""
import dataclasses

import pytest
import torch

import skipkernels
from skipkernels.pet import apply_pet, pet_config
from skipkernels.prediction import load_classifier, predict
from skipkernels.skip.tuner import SkipConfig, SkipTuner
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune

from conftest import tiny_clip

CLASSES = ["ant", "bee", "cow", "dog"]


@pytest.fixture(scope="module")
def ctx(tokenizer):
    skip = SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4)), CLASSES, tokenizer, SkipConfig(skip_layers=2))
    ft = SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4)), CLASSES, tokenizer, SkipConfig(mode="ft"))
    images = torch.randn(2, 3, 32, 32)
    return {"skip": skip, "ft": ft, "images": images, "prefix": skip.image_prefix(images), "tokenizer": tokenizer,
            "labels": torch.tensor([0, 1])}


def new_tuner(c, **kwargs):
    """SkipTuner with these arguments; SkipConfig's fields among them go into its config."""
    args = {"model": tiny_clip(layers=4), "classnames": CLASSES, "tokenizer": c["tokenizer"], **kwargs}
    fields = {f.name for f in dataclasses.fields(SkipConfig)} & set(args)
    if fields:
        args["config"] = SkipConfig(**{name: args.pop(name) for name in fields})
    return SkipTuner(args.pop("model"), args.pop("classnames"), args.pop("tokenizer"), **args)


# (case id, call(ctx), exception type, a word of its message)
CASES = [
    # patch_clip / unpatch_clip
    ("patch: not a model", lambda c: skipkernels.patch_clip("ViT-B-16"), TypeError, "model must be"),
    ("patch: a plain module", lambda c: skipkernels.patch_clip(torch.nn.Linear(2, 2)), TypeError, "CLIP"),
    ("patch: unknown backend", lambda c: skipkernels.patch_clip(tiny_clip(), policy="fast"), ValueError,
     "unknown backend"),
    ("unpatch: not a model", lambda c: skipkernels.unpatch_clip(None), TypeError, "model must be"),
    # SkipTuner(...)
    ("tuner: not a model", lambda c: new_tuner(c, model=[1, 2]), TypeError, "model must be"),
    ("tuner: classnames a string", lambda c: new_tuner(c, classnames="cat"), TypeError, "single string"),
    ("tuner: classnames a tensor", lambda c: new_tuner(c, classnames=torch.arange(3)), TypeError, "class names"),
    ("tuner: classnames of ints", lambda c: new_tuner(c, classnames=[1, 2]), TypeError, "must hold strings"),
    ("tuner: classnames None", lambda c: new_tuner(c, classnames=None), TypeError, "class names"),
    ("tuner: classnames empty", lambda c: new_tuner(c, classnames=[]), ValueError, "classnames is empty"),
    ("tuner: blank class name", lambda c: new_tuner(c, classnames=["cat", " "]), ValueError, "non-empty"),
    ("tuner: duplicated classes", lambda c: new_tuner(c, classnames=["cat", "cat"]), ValueError, "duplicated"),
    ("tuner: tokenizer not callable", lambda c: new_tuner(c, tokenizer="ViT-B-16"), TypeError, "tokenizer must"),
    ("tuner: config of another type", lambda c: new_tuner(c, config={"mode": "skip"}), TypeError, "SkipConfig"),
    ("tuner: unknown option", lambda c: new_tuner(c, omega=2), TypeError, "omega"),
    ("tuner: omega too large", lambda c: new_tuner(c, skip_layers=6), ValueError, "skip_layers must be in"),
    ("tuner: omega negative", lambda c: new_tuner(c, skip_layers=-1), ValueError, "skip_layers must be in"),
    ("tuner: unknown mode", lambda c: new_tuner(c, mode="fast"), ValueError, "mode must be one of"),
    ("tuner: unknown backend", lambda c: new_tuner(c, policy="fast"), ValueError, "unknown backend"),
    ("tuner: top_ratio 0", lambda c: new_tuner(c, top_ratio=0), ValueError, "top_ratio"),
    # image_prefix / encode_images
    ("prefix: empty batch", lambda c: c["skip"].image_prefix(torch.randn(0, 3, 32, 32)), ValueError, "empty batch"),
    ("prefix: 1 channel", lambda c: c["skip"].image_prefix(torch.randn(2, 1, 32, 32)), ValueError, "3 channels"),
    ("prefix: uint8", lambda c: c["skip"].image_prefix(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)), TypeError,
     "floating point"),
    ("prefix: wrong size", lambda c: c["skip"].image_prefix(torch.randn(2, 3, 48, 48)), ValueError, "32x32"),
    ("prefix: 3-D image", lambda c: c["skip"].image_prefix(torch.randn(3, 32, 32)), ValueError, "4-D"),
    ("prefix: a list", lambda c: c["skip"].image_prefix([torch.randn(3, 32, 32)]), TypeError, "tensor of images"),
    ("prefix: a numpy array", lambda c: c["skip"].image_prefix(torch.randn(1, 3, 32, 32).numpy()), TypeError,
     "tensor of images"),
    ("encode_images: uint8", lambda c: c["ft"].encode_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)),
     TypeError, "floating point"),
    ("encode_images: wrong size", lambda c: c["ft"].encode_images(torch.randn(1, 3, 16, 16)), ValueError, "32x32"),
    # encode_classes
    ("encode_classes: a string", lambda c: c["skip"].encode_classes("cat"), TypeError, "single string"),
    ("encode_classes: empty", lambda c: c["skip"].encode_classes([]), ValueError, "empty"),
    ("encode_classes: batch_size 0", lambda c: c["skip"].encode_classes(["cat"], batch_size=0), ValueError,
     "batch_size"),
    ("encode_classes: batch_size float", lambda c: c["skip"].encode_classes(["cat"], batch_size=2.5), TypeError,
     "batch_size"),
    # loss
    ("loss: raw images for the prefix", lambda c: c["skip"].loss(c["images"], c["labels"]), ValueError,
     "image_prefix"),
    ("loss: prefix of another width", lambda c: c["skip"].loss(torch.randn(2, 17, 8), c["labels"]), ValueError,
     "image_prefix"),
    ("loss: empty prefix", lambda c: c["skip"].loss(c["prefix"][:0], c["labels"][:0]), ValueError, "empty batch"),
    ("loss: labels a list", lambda c: c["skip"].loss(c["prefix"], [0, 1]), TypeError, "torch.tensor(labels)"),
    ("loss: float labels", lambda c: c["skip"].loss(c["prefix"], torch.tensor([0.0, 1.0])), TypeError,
     "integer class indices"),
    ("loss: too few labels", lambda c: c["skip"].loss(c["prefix"], torch.tensor([0])), ValueError, "shape (2,)"),
    ("loss: 2-D labels", lambda c: c["skip"].loss(c["prefix"], torch.tensor([[0], [1]])), ValueError, "shape (2,)"),
    ("loss: label out of range", lambda c: c["skip"].loss(c["prefix"], torch.tensor([0, 4])), ValueError,
     "labels must lie in"),
    ("loss: negative label", lambda c: c["skip"].loss(c["prefix"], torch.tensor([-1, 0])), ValueError,
     "labels must lie in"),
    ("loss ft: prefix instead of images", lambda c: c["ft"].loss(c["prefix"], c["labels"]), ValueError, "4-D"),
    ("loss ft: 1 channel", lambda c: c["ft"].loss(torch.randn(2, 1, 32, 32), c["labels"]), ValueError,
     "3 channels"),
    ("loss static: float labels", lambda c: c["skip"].loss(c["prefix"], torch.tensor([0.0, 1.0]), static=True),
     TypeError, "integer class indices"),
    # parameter_groups
    ("groups: lr 0", lambda c: c["skip"].parameter_groups(lr=0), ValueError, "lr must be > 0"),
    ("groups: lr a string", lambda c: c["skip"].parameter_groups(lr="2e-5"), TypeError, "lr must be a number"),
    ("groups: negative lr_image", lambda c: c["skip"].parameter_groups(lr=1e-3, lr_image=-1), ValueError,
     "lr_image"),
    ("groups: negative weight decay", lambda c: c["skip"].parameter_groups(lr=1e-3, weight_decay=-1), ValueError,
     "weight_decay must be >= 0"),
    # predict / load_classifier
    ("predict: not a tuner", lambda c: predict(tiny_clip(), ["a.png"], CLASSES), TypeError, "SkipTuner"),
    ("predict: one path as a string", lambda c: predict(c["ft"], "a.png", CLASSES), TypeError, "single path"),
    ("predict: classnames a string", lambda c: predict(c["ft"], ["a.png"], "cat"), TypeError, "single string"),
    ("predict: top_k 0", lambda c: predict(c["ft"], ["a.png"], CLASSES, top_k=0), ValueError, "top_k"),
    ("predict: paths of ints", lambda c: predict(c["ft"], [1, 2], CLASSES), TypeError, "each image"),
    ("predict: batch_size 0", lambda c: predict(c["ft"], ["a.png"], CLASSES, batch_size=0), ValueError,
     "batch_size"),
    ("load_classifier: classnames a string", lambda c: load_classifier("cat", "skipkernels-tiny"), TypeError,
     "single string"),
    ("load_classifier: bad device", lambda c: load_classifier(CLASSES, "skipkernels-tiny", device="gpu0"),
     ValueError, "not a device"),
    ("load_classifier: template without {}", lambda c: load_classifier(CLASSES, "skipkernels-tiny",
                                                                       template="a photo"), ValueError, "{}"),
    ("load_classifier: missing checkpoint", lambda c: load_classifier(CLASSES, checkpoint="/no/such/run"),
     FileNotFoundError, "checkpoint not found"),
    ("load_classifier: checkpoint a number", lambda c: load_classifier(CLASSES, checkpoint=3), TypeError,
     "checkpoint must be a path"),
    # apply_pet
    ("apply_pet: not a model", lambda c: apply_pet("model", pet_config(method="lora")), TypeError, "model must be"),
    ("apply_pet: config a string", lambda c: apply_pet(tiny_clip(), "lora"), TypeError, "LoRAConfig"),
    ("apply_pet: filter not callable", lambda c: apply_pet(tiny_clip(), pet_config(method="lora"), filter_fn=1),
     TypeError, "filter_fn"),
    # finetune
    ("finetune: data_root None", lambda c: finetune(None, "synthetic", "skipkernels-tiny"), TypeError,
     "data_root must be a path"),
    ("finetune: skip a dict", lambda c: finetune(".", None, "skipkernels-tiny", skip={"mode": "skip"}), TypeError,
     "SkipConfig"),
    ("finetune: train a dict", lambda c: finetune(".", None, "skipkernels-tiny", train={"epochs": 1}), TypeError,
     "TrainConfig"),
    ("finetune: model not a name", lambda c: finetune(".", None, tiny_clip()), TypeError, "model_name"),
    ("finetune: bad device", lambda c: finetune(".", None, "skipkernels-tiny", device="gpu"), ValueError,
     "not a device"),
    ("finetune: bad train field", lambda c: finetune(".", None, "skipkernels-tiny", train=TrainConfig(epochs=0)),
     ValueError, "epochs"),
    ("finetune: bad skip field", lambda c: finetune(".", None, "skipkernels-tiny", skip=SkipConfig(lam=-1)),
     ValueError, "lam"),
]


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("call,error,word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_clearly(call, error, word, ctx):
    with pytest.raises(Exception) as info:
        call(ctx)
    assert type(info.value) is error or (isinstance(info.value, error) and type(info.value).__module__.startswith(
        "skipkernels")), f"{type(info.value).__name__}: {info.value}"
    assert word in str(info.value), str(info.value)


def test_good_input_still_runs(ctx):
    """The checks leave valid calls alone: a step on the prefix, int32 labels, the static path."""
    skip = ctx["skip"]
    loss = skip.loss(skip.image_prefix(ctx["images"]), torch.tensor([0, 3], dtype=torch.int32))
    assert torch.isfinite(loss)
    assert torch.isfinite(skip.loss(ctx["prefix"], ctx["labels"], static=True))
    assert skip.encode_classes(("cat", "dog")).shape[0] == 2  # a tuple of names is a list of names
    assert len(skip.parameter_groups(lr=1e-3, lr_image=0.5, weight_decay=0)) == 2
