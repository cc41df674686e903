"""Skip Tuning on the open_clip families in use today, at tiny random-weight sizes: SigLIP and
SigLIP 2 (timm ViT with 'map' attention pooling; bidirectional text pooled at the last token;
logit_bias), EVA-02 (timm Eva with rotary embeddings and SwiGLU), a plain CLIP ViT-L/14-like
model (DFN, MetaCLIP), ViTamin (convolutional stem, GeGLU blocks), and two variants that switch
the exact savings differently: a bidirectional text tower pooled at EOT, and a timm ViT with
class-token pooling. Each must give the loss and gradients of a straightforward computation on
the plain, unpatched model for the same class subset."""
import copy

import pytest
import torch

import skipkernels
from conftest import assert_grads_equal, plain_loss_and_grads, tuner_loss_and_grads
from skipkernels import SkipConfig, SkipTuner
from skipkernels.families import model_towers
from skipkernels.models import create_model, open_clip_module

CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "a very long class name with many words",
           "cat", "dog", "purple hexagon"]
FAMILIES = ["siglip", "siglip2", "eva02", "vit-l", "bidir-text", "timm-token", "vitamin"]
# The real configs the tiny ones stand for (same block classes, pooling and masks).
REAL = {"siglip": "ViT-B-16-SigLIP", "siglip2": "ViT-B-16-SigLIP2", "eva02": "EVA02-B-16"}


def build(family, seed=0):
    """(model, tokenizer): a tiny random-weight model of ``family`` and open_clip's BPE tokenizer at
    the model's context length (no network: SigLIP's own tokenizer would come from the hub)."""
    if family == "vit-l":
        open_clip = open_clip_module()
        torch.manual_seed(seed)
        # ViT-L-14-quickgelu's layout (DFN, MetaCLIP): patch 14, wider image than text tower, QuickGELU
        model = open_clip.CLIP(embed_dim=48, quick_gelu=True,
                               vision_cfg=dict(image_size=28, patch_size=14, width=64, head_width=16, layers=3),
                               text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=4, layers=3))
        return model, open_clip.get_tokenizer("ViT-B-16")
    if family == "bidir-text":
        open_clip = open_clip_module()
        torch.manual_seed(seed)
        # open_clip ViT with a bidirectional text tower pooled at EOT (MobileCLIP's text tower)
        model = open_clip.CustomTextCLIP(
            embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, head_width=16, layers=3),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3, no_causal_mask=True))
        return model, open_clip.get_tokenizer("ViT-B-16")
    if family == "timm-token":
        # a timm ViT with a class token, 'token' pooling, qk-norm and LayerScale (its blocks go
        # through the op layer, and the last one is pruned) under SigLIP's text tower
        model, tokenizer = create_model("skipkernels-tiny-siglip", seed=seed, tokenizer="ViT-B-16")
        from timm.models.vision_transformer import VisionTransformer  # after open_clip, as above
        model.visual.trunk = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                                               qk_norm=True, init_values=0.5, global_pool="token", num_classes=64)
        return model, tokenizer
    if family == "vitamin":
        # ViTamin-S's layout: a convolutional stem (HybridEmbed) in front of timm ViT blocks with a
        # GeGLU MLP, 'avg' pooling, TimmModel's linear projection; CLIP's causal text tower
        model, tokenizer = create_model("skipkernels-tiny-eva02", seed=seed, tokenizer="ViT-B-16")
        import timm  # after open_clip, whose import makes torchvision (and so timm) importable here
        model.visual.trunk = timm.create_model("vitamin_small_224", img_size=32, depth=3, num_classes=0)
        model.visual.head = torch.nn.Sequential(torch.nn.Linear(model.visual.trunk.num_features, 64, bias=False))
        return model, tokenizer
    return create_model(f"skipkernels-tiny-{family}", seed=seed, tokenizer="ViT-B-16")


def image_size(model):
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


@pytest.mark.parametrize("family", list(REAL))
def test_tiny_configs_have_the_real_models_layout(family, open_clip):
    model, _ = build(family)
    real = open_clip.get_model_config(REAL[family])
    tiny = open_clip.get_model_config(f"skipkernels-tiny-{family}")
    for key in ("no_causal_mask", "pool_type", "proj_bias", "act_kwargs", "norm_kwargs"):
        assert tiny["text_cfg"].get(key) == real["text_cfg"].get(key), key
    for key in ("timm_pool", "timm_proj"):
        assert tiny["vision_cfg"].get(key) == real["vision_cfg"].get(key), key
    assert ("init_logit_bias" in tiny) == ("init_logit_bias" in real)
    trunk, block = model.visual.trunk, model.visual.trunk.blocks[0]
    if family.startswith("siglip"):
        assert (type(trunk).__name__, type(block).__name__) == ("VisionTransformer", "Block")
        assert trunk.attn_pool is not None and trunk.num_prefix_tokens == 0
        assert model.text.attn_mask is None and model.logit_bias is not None
    else:
        assert (type(trunk).__name__, type(block).__name__, type(block.mlp).__name__) == ("Eva", "EvaBlock", "SwiGLU")
        assert trunk.rope is not None and trunk.global_pool == "token"
        assert model.text.attn_mask is not None and model.text.pool_type == "argmax"


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_keeps_outputs_and_state_dict(family):
    model, tokenizer = build(family)
    model.eval()
    images = torch.randn(3, 3, image_size(model), image_size(model))
    tokens = tokenizer(["a red circle", "a photo of two dogs on a green lawn", "x"])

    def outputs():
        with torch.no_grad():
            return (model.encode_image(images), model.encode_text(tokens), *model(images, tokens))

    before = outputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    skipkernels.patch_clip(model)
    assert "encode_text" in model.__dict__ and "encode_image" in model.__dict__
    # the op layer computes open_clip blocks and timm ViT blocks with the plain Mlp; Eva blocks and
    # ViTamin's GeGLU blocks keep their own forward
    image_blocks = model_towers(model)[0].blocks
    fused = {"ResidualAttentionBlock", "Block/Mlp"}
    assert all(("forward" in b.__dict__) == ({type(b).__name__, f"{type(b).__name__}/{type(b.mlp).__name__}"} & fused != set())
               for b in image_blocks)
    for a, b in zip(before, outputs()):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * a.abs().max()
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    skipkernels.unpatch_clip(model)
    for a, b in zip(before, outputs()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["skip", "ft"])
def test_loss_and_grads_equal_the_plain_model_on_the_subset(family, mode):
    model, tokenizer = build(family, seed=1)
    plain = copy.deepcopy(model)
    skipkernels.patch_clip(model)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=2, top_ratio=0.25, lam=0.5))
    for p_plain, p in zip(plain.parameters(), model.parameters()):
        p_plain.requires_grad_(p.requires_grad)
    size = image_size(model)
    images, labels = torch.randn(4, 3, size, size), torch.tensor([6, 2, 6, 3])
    inputs = tuner.image_prefix(images) if mode == "skip" else images
    loss, grads = tuner_loss_and_grads(tuner, inputs, labels)
    selected = tuner.last_selected if mode == "skip" else torch.arange(len(CLASSES))
    if mode == "skip":
        assert len(selected) < len(CLASSES)
    expected_loss, expected = plain_loss_and_grads(plain, images, tuner.last_labels,
                                                    [CLASSES[i] for i in selected.tolist()], tokenizer)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert_grads_equal(expected, grads, rel=1e-4)  # fp32: sums over up to 77 bidirectional keys


@pytest.mark.parametrize("family", FAMILIES)
def test_lskip_freezes_exactly_the_blocks_below_omega(family):
    model, tokenizer = build(family)
    omega = 2
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="lskip", skip_layers=omega))
    trainable = {n[len("model."):] for n, _ in tuner.trainable_named_parameters()}
    if family == "vit-l":
        image_blocks, text_blocks = "visual.transformer.resblocks", "transformer.resblocks"
        heads = {"visual.proj", "visual.ln_post.weight", "text_projection", "ln_final.weight"}
    elif family == "bidir-text":
        image_blocks, text_blocks = "visual.transformer.resblocks", "text.transformer.resblocks"
        heads = {"visual.proj", "visual.ln_post.weight", "text.text_projection", "text.ln_final.weight"}
    else:
        image_blocks, text_blocks = "visual.trunk.blocks", "text.transformer.resblocks"
        heads = {"text.ln_final.weight"}
        heads |= ({"visual.trunk.norm.weight", "visual.trunk.attn_pool.latent"} if family.startswith("siglip") else
                  {"visual.trunk.fc_norm.weight", "visual.head.0.weight"} if family == "vitamin" else
                  {"visual.trunk.norm.weight", "visual.trunk.head.weight"})
        heads |= {"text.text_projection" if isinstance(model.text.text_projection, torch.nn.Parameter)
                  else "text.text_projection.weight"}
    assert heads <= trainable
    for tower in (image_blocks, text_blocks):
        for name, _ in model.named_parameters():
            if name.startswith(tower + "."):
                index = int(name[len(tower) + 1:].split(".")[0])
                assert (name in trainable) == (index >= omega), name
    # the stems, embeddings, logit scale and bias stay frozen
    frozen = [n for n, _ in model.named_parameters() if n not in trainable]
    assert "logit_scale" in frozen and all("block" not in n or "." in n for n in frozen)
    stems = [n for n in frozen if "patch_embed" in n or "token_embedding" in n or "conv1" in n or "pos" in n]
    assert len(stems) >= 3
    assert not any(n.startswith(("visual.trunk.patch_embed", "text.token_embedding", "visual.conv1"))
                   for n in trainable)
    if getattr(model, "logit_bias", None) is not None:
        assert "logit_bias" in frozen


EXPECTED_SAVINGS = {
    # SigLIP text: bidirectional, pooled at the last token: no truncation, pruning exact; 'map' image pooling.
    "siglip": {"text truncation": "not causal", "image last-block pruning": "'map'", "text last-block pruning": None},
    "siglip2": {"text truncation": "not causal", "image last-block pruning": "'map'", "text last-block pruning": None},
    # EVA-02: causal argmax text; the image tower's token pooling is exact, but Eva blocks run as modules.
    "eva02": {"text truncation": None, "image last-block pruning": "EvaBlock", "text last-block pruning": None},
    "vit-l": {"text truncation": None, "image last-block pruning": None, "text last-block pruning": None},
    "timm-token": {"text truncation": "not causal", "image last-block pruning": None, "text last-block pruning": None},
    "vitamin": {"text truncation": None, "image last-block pruning": "'avg'", "text last-block pruning": None},
    # bidirectional text pooled at EOT: every token reaches EOT, so no truncation; pruning is exact.
    "bidir-text": {"text truncation": "not causal", "image last-block pruning": None, "text last-block pruning": None},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_savings_apply_only_where_exact_and_say_so(family):
    model, tokenizer = build(family)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="lskip", skip_layers=1))
    text = repr(tuner)
    for name, off in EXPECTED_SAVINGS[family].items():
        state = tuner.savings[name]
        assert (state == "on") if off is None else (state.startswith("off (") and off in state), (name, state)
        assert f"{name}: {state}" in text
    truncated = tuner.text_cache.tokens_at_block.shape[1] < tuner.class_tokens.shape[1]
    assert truncated == (EXPECTED_SAVINGS[family]["text truncation"] is None)
    off = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="lskip", skip_layers=1, prune_last_block=False))
    assert off.savings["text last-block pruning"] == "off (turned off in the config)"


def test_token_dropping_keeps_prefix_tokens_and_refuses_rotary_embeddings():
    from skipkernels.skip.lskip import _drop_patch_tokens
    x = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9, 1)
    kept = _drop_patch_tokens(x, 0.5, torch.Generator().manual_seed(0), prefix=2)
    assert kept.shape == (2, 2 + 4, 1) and torch.equal(kept[:, :2], x[:, :2])
    model, tokenizer = build("eva02")
    with pytest.raises(ValueError, match="rotary"):
        SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="skip", skip_layers=1, drop_ratio=0.5))


def test_pet_methods_are_refused_where_their_modules_cannot_attach():
    model, tokenizer = build("eva02")
    with pytest.raises(ValueError, match="EvaBlock blocks would get none"):
        SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="lskip-lora", skip_layers=1))
    model, tokenizer = build("bidir-text")  # open_clip blocks in both towers
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="lskip-lora", skip_layers=1))
    assert tuner.pet is not None
    # LoRA reaches the op layer's route as hooks (or through the adapted weight): the last blocks
    # stay pruned, which is exact since LoRA reads each token row on its own
    assert tuner.savings["image last-block pruning"] == "on"


def test_coop_learns_the_context_of_a_custom_text_model():
    model, tokenizer = build("siglip")
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="coop", coop_n_ctx=4))
    tuner.loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 3])).backward()
    assert [n for n, _ in tuner.trainable_named_parameters()] == ["prompt_learner.ctx"]
    assert tuner.prompt_learner.ctx.grad.abs().sum() > 0


def test_convolutional_and_hybrid_towers_are_refused_with_the_reason(open_clip):
    text_cfg = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    convnext = open_clip.CustomTextCLIP(32, dict(timm_model_name="convnext_atto", timm_pool="avg",
                                                 timm_proj="linear", image_size=32), text_cfg)
    with pytest.raises(TypeError, match="ConvNeXt"):
        skipkernels.patch_clip(convnext)
    fastvit = open_clip.CustomTextCLIP(32, dict(timm_model_name="fastvit_t8", timm_pool="avg",
                                                timm_proj="linear", image_size=32), text_cfg)
    with pytest.raises(TypeError, match="hybrid"):
        SkipTuner(fastvit, CLASSES, open_clip.get_tokenizer("ViT-B-16"), SkipConfig(skip_layers=1))


def test_tokenizer_must_fit_the_model():
    model, _ = build("siglip")
    open_clip = open_clip_module()
    with pytest.raises(ValueError, match="context"):
        # 77 tokens for a 16-token context
        SkipTuner(model, CLASSES, open_clip.get_tokenizer("ViT-B-16"), SkipConfig(skip_layers=1))
    small_vocab = copy.deepcopy(model)
    small_vocab.text.token_embedding = torch.nn.Embedding(100, 64)
    with pytest.raises(ValueError, match="vocabulary"):
        SkipTuner(small_vocab, CLASSES, open_clip.get_tokenizer("ViT-B-16", context_length=16),
                  SkipConfig(skip_layers=1))


def test_a_local_hugging_face_tokenizer_folder_needs_no_network(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of"] + sorted({w.strip(".") for c in CLASSES for w in c.split()})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    model, tokenizer = create_model("skipkernels-tiny-siglip", tokenizer=str(tmp_path))
    tokens = tokenizer(["a photo of a cat."])
    assert tokens.shape == (1, 16) and int(tokens[0, 1]) == words.index("photo")
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5))
    loss = tuner.loss(tuner.image_prefix(torch.randn(2, 3, 32, 32)), torch.tensor([0, 5]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        create_model("skipkernels-tiny-siglip", tokenizer=str(tmp_path / "missing"))


@pytest.mark.parametrize("family", list(REAL))
def test_info_command_shows_the_towers_and_savings(family, capsys):
    from skipkernels.cli import main
    assert main(["info", "--model", f"skipkernels-tiny-{family}"]) == 0
    printed = capsys.readouterr().out
    assert "image tower: timm" in printed
    for name, off in EXPECTED_SAVINGS[family].items():
        assert f"{name}: {'on' if off is None else 'off ('}" in printed
    # the plan: what each sub-layer of each run of blocks runs (Eva's blocks run their own forward)
    assert "plan:" in printed and "image tower (timm" in printed and "text tower (open_clip text" in printed
    if family == "eva02":
        assert "runs: its own forward (EvaBlock is not a block the op layer computes" in printed
    else:
        assert "qkv: layer_norm_linear: layer_norm then linear_act, each PyTorch reference" in printed
