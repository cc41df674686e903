import copy

import pytest
import torch

import skipkernels
from conftest import TUNER_CLASSES as CLASSES
from conftest import assert_grads_equal, plain_loss_and_grads, tiny_clip, tuner_loss_and_grads
from skipkernels import SkipConfig, SkipTuner


@pytest.mark.parametrize("block", ["default", "custom"])
@pytest.mark.parametrize("omega", [0, 2])
def test_lskip_loss_and_grads_equal_plain_computation(block, omega, tokenizer):
    model = tiny_clip(block, layers=3)
    plain = copy.deepcopy(model)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="lskip", skip_layers=omega))
    for p_plain, (name, p) in zip(plain.parameters(), model.named_parameters()):
        p_plain.requires_grad_(p.requires_grad)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 5, 5, 7])
    expected_loss, expected = plain_loss_and_grads(plain, images, labels, CLASSES, tokenizer)
    loss, grads = tuner_loss_and_grads(tuner, tuner.image_prefix(images), labels)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert_grads_equal(expected, grads)
    # LSkip trains blocks >= omega and the heads; everything below omega and logit_scale is frozen.
    trainable = {n for n, _ in tuner.trainable_named_parameters()}
    assert "model.logit_scale" not in trainable
    assert not any(n.startswith(f"model.visual.transformer.resblocks.{i}.") for n in trainable for i in range(omega))
    assert any(n.startswith(f"model.visual.transformer.resblocks.{omega}.") for n in trainable)
    assert "model.visual.proj" in trainable and "model.text_projection" in trainable
    assert "model.token_embedding.weight" not in trainable and "model.visual.conv1.weight" not in trainable


def test_ft_trains_everything_but_logit_scale(tokenizer):
    model = tiny_clip()
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="ft"))
    trainable = {n for n, _ in tuner.trainable_named_parameters()}
    all_names = {f"model.{n}" for n, _ in model.named_parameters()}
    assert trainable == all_names - {"model.logit_scale"}
    plain = copy.deepcopy(model)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 1])
    expected_loss, expected = plain_loss_and_grads(plain, images, labels, CLASSES, tokenizer)
    loss, grads = tuner_loss_and_grads(tuner, images, labels)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert_grads_equal(expected, grads)


@pytest.mark.parametrize("mode", ["skip", "cskip"])
def test_cskip_loss_equals_plain_computation_on_the_subset(mode, tokenizer):
    model = tiny_clip(layers=3)
    plain = copy.deepcopy(model)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=1, top_ratio=0.25, lam=0.5))
    for p_plain, p in zip(plain.parameters(), model.parameters()):
        p_plain.requires_grad_(p.requires_grad)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([6, 2, 6, 3])
    inputs = tuner.image_prefix(images) if mode == "skip" else images
    loss, grads = tuner_loss_and_grads(tuner, inputs, labels)
    selected, remapped = tuner.last_selected, tuner.last_labels
    assert len(selected) < len(CLASSES)
    expected_loss, expected = plain_loss_and_grads(plain, images, remapped, [CLASSES[i] for i in selected.tolist()],
                                                    tokenizer)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert_grads_equal(expected, grads)


@pytest.mark.parametrize("mode", ["skip", "ft"])
def test_truncation_and_pruning_change_nothing(mode, tokenizer):
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([4, 0, 4])
    results = []
    for truncate in (True, False):
        for prune in (True, False):
            model = tiny_clip(layers=3, seed=11)
            config = SkipConfig(mode=mode, skip_layers=1, truncate_text=truncate, prune_last_block=prune, top_ratio=0.5)
            tuner = SkipTuner(model, CLASSES, tokenizer, config)
            inputs = tuner.image_prefix(images) if mode == "skip" else images
            results.append(tuner_loss_and_grads(tuner, inputs, labels))
    loss0, grads0 = results[0]
    for loss, grads in results[1:]:
        assert torch.allclose(loss, loss0, rtol=1e-5)
        assert_grads_equal(grads0, grads)


def test_truncated_text_cache_is_shorter_than_context(tokenizer):
    tuner = SkipTuner(tiny_clip(), CLASSES, tokenizer, SkipConfig(mode="lskip", skip_layers=1))
    length = tuner.text_cache.tokens_at_block.shape[1]
    assert length % 8 == 0 and length < 77
    assert length >= int(tuner.text_cache.pool_index.max()) + 1


def test_encode_matches_open_clip(tokenizer):
    model = tiny_clip().eval()
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="ft"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_i = model.encode_image(images)
        expected_t = model.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSES]))
        assert torch.allclose(tuner.encode_images(images), expected_i, rtol=1e-4, atol=1e-5)
        assert torch.allclose(tuner.encode_classes(CLASSES), expected_t, rtol=1e-4, atol=1e-5)


def test_coop_trains_only_context(tokenizer):
    model = tiny_clip()
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="coop", coop_n_ctx=4))
    assert [n for n, _ in tuner.trainable_named_parameters()] == ["prompt_learner.ctx"]
    # "a photo of a" is four tokens: the context starts as their embeddings
    init = tokenizer(["a photo of a"])[0, 1:5]
    assert torch.allclose(tuner.prompt_learner.ctx, model.token_embedding.weight[init])
    loss = tuner.loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 3]))
    loss.backward()
    assert tuner.prompt_learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_raise_clear_errors(tokenizer):
    model = tiny_clip(layers=3)
    with pytest.raises(ValueError, match="classnames is empty"):
        SkipTuner(model, [], tokenizer)
    with pytest.raises(ValueError, match="skip_layers must be in"):
        SkipTuner(model, CLASSES, tokenizer, SkipConfig(skip_layers=3))
    with pytest.raises(ValueError, match="skip_layers must be in"):
        SkipTuner(model, CLASSES, tokenizer, SkipConfig(skip_layers=-1))
    with pytest.raises(ValueError, match="duplicated class names"):
        SkipTuner(model, ["cat", "dog", "cat"], tokenizer)
    with pytest.raises(ValueError, match="mode must be one of"):
        SkipConfig(mode="nope")
    with pytest.raises(ValueError, match="top_ratio"):
        SkipConfig(top_ratio=0)
    with pytest.raises(ValueError, match="lam"):
        SkipConfig(lam=-1)
    with pytest.raises(TypeError, match="expected an open_clip CLIP"):
        SkipTuner(torch.nn.Linear(2, 2), CLASSES, tokenizer)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(skip_layers=1))
    x = tuner.image_prefix(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="labels must lie in"):
        tuner.loss(x, torch.tensor([0, len(CLASSES)]))
    with pytest.raises(ValueError, match="labels must lie in"):
        tuner.loss(x, torch.tensor([-1, 0]))


def test_omega_defaults_to_half_the_blocks_and_says_why(tokenizer, open_clip):
    assert SkipConfig().skip_layers is None  # the default, resolved where the model is known
    tuner = SkipTuner(tiny_clip(layers=4), CLASSES, tokenizer)
    assert tuner.skip_layers == tuner.plan.skip_layers == tuner.config.skip_layers == 2
    assert "omega 2 (default: half of the 4 blocks)" in repr(tuner)
    assert repr(tuner).startswith("SkipTuner(") and "resblocks" not in repr(tuner)  # a summary, not the model
    # the plan, per run of equal blocks: what each sub-layer runs
    assert "kernel policy: auto" in repr(tuner) and "blocks 0-3 (ResidualAttentionBlock):" in repr(tuner)
    assert "mlp: layer_norm_mlp (gelu)" in repr(tuner)
    assert tuner.text_cache.tokens_at_block.shape[0] == len(CLASSES)
    trainable = {n for n, _ in tuner.trainable_named_parameters()}
    assert "model.transformer.resblocks.2.attn.in_proj_weight" in trainable
    assert "model.transformer.resblocks.1.attn.in_proj_weight" not in trainable
    # One omega cuts both towers: towers of different depth get half of the shallower one.
    vision = dict(image_size=32, patch_size=8, width=64, head_width=16, layers=5)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3)
    uneven = SkipTuner(open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text), CLASSES, tokenizer)
    assert uneven.skip_layers == 1
    assert "omega 1 (default: half of the shallower tower's 3 blocks (image 5, text 3))" in repr(uneven)
    given = SkipTuner(tiny_clip(layers=4), CLASSES, tokenizer, SkipConfig(skip_layers=3))
    assert given.skip_layers == 3 and "omega 3 (given)" in repr(given)
    ft = SkipTuner(tiny_clip(layers=4), CLASSES, tokenizer, SkipConfig(mode="ft"))
    assert ft.plan.skip_layers == 0 and "omega 0 (nothing is cached in mode ft)" in repr(ft)
    # One number for omega: the plan's, also in the config a mode that caches nothing was given.
    assert ft.config.skip_layers == ft.skip_layers == 0
    coop = SkipTuner(tiny_clip(layers=4), CLASSES, tokenizer, SkipConfig(mode="coop", skip_layers=3))
    assert coop.config.skip_layers == coop.skip_layers == coop.plan.skip_layers == 0
    with pytest.raises(ValueError, match="skip_layers must be in \\[0, 4\\)"):
        # the paper's 6 is out of range here
        SkipTuner(tiny_clip(layers=4), CLASSES, tokenizer, SkipConfig(skip_layers=6))


def test_public_api_exports():
    assert skipkernels.SkipTuner is SkipTuner and skipkernels.SkipConfig is SkipConfig
