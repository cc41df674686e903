import pytest
import torch
import torch.nn as nn

import skipkernels
from conftest import tiny_clip

CONFIGS = [
    ("default", {}),
    ("default", {"quick_gelu": True}),
    ("default", {"ls_init_value": 0.5}),
    ("custom", {}),
    ("custom", {"qk_norm": True}),
]


def _outputs(model, images, tokens):
    with torch.no_grad():
        return (model.encode_image(images), model.encode_text(tokens), *model(images, tokens)[:2])


@pytest.mark.parametrize("block,extra", CONFIGS)
def test_patched_outputs_equal_unpatched(block, extra, tokenizer):
    model = tiny_clip(block, **dict(extra)).eval()
    expected_block = "CustomResidualAttentionBlock" if block == "custom" else "ResidualAttentionBlock"
    assert type(model.visual.transformer.resblocks[0]).__name__ == expected_block
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a red circle", "a photo of two dogs on a green lawn", "x"])
    before = _outputs(model, images, tokens)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    names_before = [n for n, _ in model.named_parameters()]
    skipkernels.patch_clip(model)
    after = _outputs(model, images, tokens)
    for a, b in zip(before, after):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert [n for n, _ in model.named_parameters()] == names_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_before[k], state_after[k]) for k in state_before)
    assert all("forward" in b.__dict__ for b in model.visual.transformer.resblocks)
    skipkernels.unpatch_clip(model)
    assert all("forward" not in b.__dict__ for b in model.visual.transformer.resblocks)
    restored = _outputs(model, images, tokens)
    for a, b in zip(before, restored):
        assert torch.equal(a, b)


def test_patched_gradients_equal(tokenizer):
    model = tiny_clip()
    images = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["a red circle", "a blue square"])

    def grads():
        model.zero_grad()
        f, t, s = model(images, tokens)
        (s * f @ t.T).logsumexp(1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g0 = grads()
    skipkernels.patch_clip(model)
    g1 = grads()
    assert g0.keys() == g1.keys()
    for name in g0:  # fp32 rounding differs between the paths: compare relative to each tensor's scale
        assert (g0[name] - g1[name]).abs().max() <= 2e-5 * g0[name].abs().max() + 1e-8, name


def test_patched_encoders_use_the_exact_savings(tokenizer):
    model = tiny_clip()
    skipkernels.patch_clip(model)
    assert "encode_text" in model.__dict__ and "encode_image" in model.__dict__
    skipkernels.unpatch_clip(model)
    assert "encode_text" not in model.__dict__ and not hasattr(model, "_skipkernels_patched")
    # a non-causal text mask: truncation would not be exact, so encode_text stays open_clip's
    model.attn_mask = torch.zeros_like(model.attn_mask)
    skipkernels.patch_clip(model)
    assert "encode_text" not in model.__dict__


def test_patched_state_dict_loads_into_fresh_model():
    model = skipkernels.patch_clip(tiny_clip(seed=3))
    fresh = tiny_clip(seed=4)
    fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_unsupported_models_are_refused(open_clip):
    with pytest.raises(TypeError, match="expected an open_clip CLIP"):
        skipkernels.patch_clip(nn.Linear(3, 3))
    resnet = open_clip.CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16),
                            text_cfg=dict(width=32, heads=2, layers=1))
    with pytest.raises(TypeError, match="ResNet"):
        skipkernels.patch_clip(resnet)
    coca_like = tiny_clip()
    coca_like.__class__ = type("CoCa", (type(coca_like),), {})
    with pytest.raises(TypeError, match="CoCa"):
        skipkernels.patch_clip(coca_like)


def test_info_reports_extension_and_ops(capsys):
    data = skipkernels.info()
    out = capsys.readouterr().out
    assert "torch" in out and "class_select" in out
    assert set(data["compiled_ops"]) >= {"class_select", "subset_logits_ce"}
    assert data["torch"] == torch.__version__
    # Every Triton op is listed with whether it can run here and what auto picks.
    assert set(data["triton_ops"]) >= {"layer_norm_linear", "attention", "linear_act", "pet_gate"}
    assert all("auto:" in status for status in data["triton_ops"].values())
    assert "layer_norm_linear" in out


def test_a_model_holds_one_plan_that_copies_with_it_and_is_left_out_of_a_pickle(tokenizer):
    """The tuner runs the plan the model holds; a deep copy holds a plan of its own modules, and
    torch.save of the model leaves the plan behind (its bound ops do not pickle)."""
    import copy
    import io

    from skipkernels import SkipConfig, SkipTuner
    from skipkernels.ops.block import held_plan
    model = tiny_clip()
    tuner = SkipTuner(model, ["a", "b"], tokenizer, SkipConfig(mode="skip", skip_layers=1))
    assert tuner.towers is held_plan(model)
    copied = copy.deepcopy(model)
    assert held_plan(copied).model is copied and held_plan(copied).image.blocks[0] is copied.visual.transformer.resblocks[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert held_plan(loaded) is None
    skipkernels.patch_clip(loaded)  # builds the loaded model's own plan
    assert held_plan(loaded).model is loaded
