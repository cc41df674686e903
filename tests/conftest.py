import os

import torch

# Triton kernels run on the CPU through the interpreter; it must be set before any @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from skipkernels._compat import import_open_clip  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_clip(block="default", seed=0, layers=3, **extra):
    """A small random-weight open_clip CLIP; ``block='custom'`` builds CustomResidualAttentionBlock."""
    open_clip = import_open_clip()
    torch.manual_seed(seed)
    vision = dict(image_size=32, patch_size=8, width=64, head_width=16, layers=layers)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=layers)
    if block == "custom":
        vision.update(block_type="custom", qk_norm=extra.pop("qk_norm", False))
        text.update(block_type="custom")
    if "ls_init_value" in extra:
        vision["ls_init_value"] = text["ls_init_value"] = extra.pop("ls_init_value")
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, **extra)
    # Random LayerNorm affine parameters so a mistake in their use shows.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model


def plain_loss_and_grads(model, images, labels, classnames, tokenizer, template="a photo of a {}."):
    """open_clip's own forward (no skipkernels): the model's logits over ``classnames`` (with its
    logit_bias, if any), cross-entropy, and the gradients of every parameter that got one."""
    model.zero_grad(set_to_none=True)
    f = model.encode_image(images, normalize=True)
    t = model.encode_text(tokenizer([template.format(c) for c in classnames]).to(images.device), normalize=True)
    logits = model.logit_scale.exp() * f @ t.T
    if getattr(model, "logit_bias", None) is not None:
        logits = logits + model.logit_bias
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tuner_loss_and_grads(tuner, inputs, labels):
    tuner.zero_grad(set_to_none=True)
    loss = tuner.loss(inputs, labels)
    loss.backward()
    return loss.detach(), {n[len("model."):]: p.grad.clone() for n, p in tuner.named_parameters()
                           if p.grad is not None}


def assert_grads_equal(expected, actual, rel=2e-5):
    # fp32 rounding differs between fused and unfused paths: compare relative to each tensor's scale
    assert expected.keys() == actual.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        assert (expected[name] - actual[name]).abs().max().item() <= rel * scale + 1e-8, name


@pytest.fixture(scope="session")
def open_clip():
    return import_open_clip()


@pytest.fixture(scope="session")
def tokenizer(open_clip):
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    from skipkernels.data.synthetic import ensure_synthetic
    return ensure_synthetic(tmp_path_factory.mktemp("data"))


def tiny_runs(synthetic_root, tmp_path_factory, modes, **train) -> dict:
    """One-epoch finetune runs of the shipped tiny model on the synthetic set, one folder per mode."""
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.job import finetune
    from skipkernels.train.trainer import TrainConfig
    out = {}
    for mode in modes:
        folder = tmp_path_factory.mktemp(mode)
        finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode=mode, skip_layers=1),
                 train=TrainConfig(epochs=1, **train), out_dir=folder)
        out[mode] = folder
    return out
