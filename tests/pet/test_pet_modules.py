import pytest
import torch
import torch.nn as nn

from skipkernels._compat import import_open_clip
from skipkernels.pet import METHODS, apply_pet, find_blocks, pet_config, trainable_modules_for_mode
from skipkernels.pet.modules import (HoulsbyAdapter, LargeGate, MiddleXGate, MiddleYGate, SmallGate,
                                     VLPETModifier)

from pet_checks import assert_only_pet_parameters_got_gradients, frozen_copy, method_config, one_thread, randomize  # one_thread: autouse

WIDTH, LAYERS = 64, 3
# A small vocabulary and context keep the text tower cheap; the EOT token is the highest id.
VOCAB, CONTEXT = 1000, 16
EOT = VOCAB - 1


def make_clip(block="default", seed=0, ls_init_value=None):
    open_clip = import_open_clip()
    torch.manual_seed(seed)
    vision = dict(image_size=32, patch_size=8, width=WIDTH, head_width=16, layers=LAYERS)
    text = dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=4, layers=LAYERS)
    if block == "custom":
        vision["block_type"] = text["block_type"] = "custom"
    if ls_init_value is not None:
        vision["ls_init_value"] = text["ls_init_value"] = ls_init_value
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def clip_inputs(seed=1, batch=2, length=12):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    text = torch.zeros(batch, CONTEXT, dtype=torch.long)
    text[:, :length] = torch.randint(1, EOT, (batch, length), generator=gen)
    text[:, length - 1] = EOT  # pooled by argmax
    return images, text


def clip_out(model, images, text):
    with torch.no_grad():
        img, txt, _ = model(images, text)
    return img, txt


def rand_nonzero(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mag = torch.rand(*shape, generator=gen) * 0.9 + 0.1
    return mag * torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0)


@pytest.fixture(scope="module", params=["default", "custom"])
def block_type(request):
    return request.param


# ---------------------------------------------------------------------------------- the gates

@pytest.mark.parametrize("granularity,shape", [("large", (3, 7, 16)), ("middle_x", (3, 7, 1)),
                                               ("middle_y", (16,)), ("small", (3, 1, 1))])
def test_gate_shape_range_and_initial_value(granularity, shape):
    torch.manual_seed(0)
    mod = VLPETModifier(16, granularity, rank=8, heads=4, gate_rank=4)
    x, h = rand_nonzero(3, 7, 16, seed=1), rand_nonzero(3, 7, 16, seed=2)
    g0 = mod.gate_value(x, h)
    assert g0.shape == shape
    init = 1.0 if granularity == "middle_y" else 0.5
    assert torch.equal(g0, torch.full(shape, init))
    assert mod.scale == 1.0 / init
    with torch.no_grad():
        for p in mod.gate.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    g = mod.gate_value(x, h)
    assert g.shape == shape
    assert g.unique().numel() > 1
    if granularity == "middle_y":
        assert torch.equal(g, 1.0 + mod.gate.z)
    else:
        assert (g > 0).all() and (g < 1).all()


def test_small_gate_is_the_token_mean_of_a_sigmoid():
    torch.manual_seed(0)
    gate = SmallGate(8)
    with torch.no_grad():
        gate.proj.weight.normal_()
        gate.proj.bias.fill_(0.3)
    x, u = rand_nonzero(2, 5, 8, seed=1), rand_nonzero(2, 5, 8, seed=2)
    expected = torch.sigmoid(torch.cat([x, u], -1) @ gate.proj.weight.T + 0.3).mean(1, keepdim=True)
    torch.testing.assert_close(gate(x, u), expected)


def test_gate_parameter_counts():
    d, g = 16, 4
    assert sum(p.numel() for p in LargeGate(d, g).parameters()) == d * g + g + g * d + d
    assert sum(p.numel() for p in MiddleXGate(d).parameters()) == d + 1
    assert sum(p.numel() for p in MiddleYGate(d).parameters()) == d
    assert sum(p.numel() for p in SmallGate(d).parameters()) == 2 * d + 1


def test_multihead_down_is_heads_concatenated():
    torch.manual_seed(0)
    mod = VLPETModifier(16, "large", rank=8, heads=4)
    down = mod.adapter.down
    x = rand_nonzero(2, 3, 16)
    per_head = [x @ down.weight[i].T + down.bias[i] for i in range(4)]
    torch.testing.assert_close(down(x), torch.cat(per_head, -1))
    with pytest.raises(ValueError):
        VLPETModifier(16, "large", rank=6, heads=4)


@pytest.mark.parametrize("granularity", ["large", "middle_x", "middle_y", "small"])
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_explicit_scale_with_zero_up_projection(granularity, scale):
    # The paper's scales: the initial output is X + s · G_init · H, not the original X + H.
    torch.manual_seed(0)
    mod = VLPETModifier(16, granularity, rank=8, heads=4, scale=scale)
    x, h = rand_nonzero(2, 5, 16, seed=1), rand_nonzero(2, 5, 16, seed=2)
    init = 1.0 if granularity == "middle_y" else 0.5
    torch.testing.assert_close(mod(x, h), x + scale * init * h)


@pytest.mark.parametrize("granularity", ["large", "middle_x", "small"])
def test_forced_gate_value_with_random_adapter(granularity):
    torch.manual_seed(0)
    mod = VLPETModifier(16, granularity, rank=8, heads=4, scale=1.5)
    with torch.no_grad():
        mod.adapter.up.weight.normal_()
        last = mod.gate.up if granularity == "large" else mod.gate.proj
        last.weight.zero_()
        last.bias.fill_(0.8)  # G = σ(0.8) for every input
    x, h = rand_nonzero(2, 5, 16, seed=1), rand_nonzero(2, 5, 16, seed=2)
    dh = mod.adapter(h)
    assert dh.abs().min() > 0
    g = torch.sigmoid(torch.tensor(0.8))
    torch.testing.assert_close(mod(x, h), x + 1.5 * g * (h + dh))
    torch.testing.assert_close(mod(None, h, gate_input=x), 1.5 * g * (h + dh))


def test_houlsby_adapter_starts_as_identity():
    torch.manual_seed(0)
    ad = HoulsbyAdapter(16, 4)
    x, h = rand_nonzero(2, 3, 16, seed=1), rand_nonzero(2, 3, 16, seed=2)
    assert torch.equal(ad(x, h), x + h)


# ------------------------------------------------------------------------- open_clip models

@pytest.mark.parametrize("method", METHODS)
def test_zero_up_projection_keeps_the_model(block_type, method):
    model = make_clip(block_type)
    images, text = clip_inputs()
    ref = clip_out(frozen_copy(model), images, text)
    handle = apply_pet(model, method_config(method, rank=8, heads=4, skip_layers=1))
    assert handle.modules
    out = clip_out(model, images, text)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    # Non-zero PET parameters do change the outputs (the modules are really on the path).
    randomize(handle)
    changed = clip_out(model, images, text)
    assert all(not torch.allclose(a, b) for a, b in zip(changed, ref))


def test_layer_scale_blocks_keep_the_model():
    model = make_clip("default", ls_init_value=0.1)
    images, text = clip_inputs()
    ref = clip_out(frozen_copy(model), images, text)
    apply_pet(model, pet_config("vlpet-small", rank=8))
    assert all(torch.equal(a, b) for a, b in zip(clip_out(model, images, text), ref))


def _count_clip(method, d, r, heads, g, blocks, towers=2, lora_targets=("q", "k", "v")):
    adapter = d * r + r + r * d + d
    per_sub = {"vlpet-large": adapter + d * g + g + g * d + d, "vlpet-middle-x": adapter + d + 1,
               "vlpet-middle-y": adapter + d, "vlpet-small": adapter + 2 * d + 1,
               "adapter": adapter}
    if method in per_sub:
        return per_sub[method] * 2 * blocks * towers
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "out": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
    per_block = sum(r * shapes[t][0] + shapes[t][1] * r for t in lora_targets)
    return per_block * blocks * towers


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("skip_layers", [0, 2])
def test_trainable_parameter_counts(block_type, method, skip_layers):
    model = make_clip(block_type)
    r, heads, g = 8, 4, 4
    handle = apply_pet(model, method_config(method, rank=r, heads=heads, gate_rank=g, skip_layers=skip_layers))
    expected = _count_clip(method, WIDTH, r, heads, g, LAYERS - skip_layers)
    assert handle.num_trainable() == expected == handle.num_pet()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # Modules only in blocks >= ω.
    for name in handle.modules:
        index = int(name.split("resblocks.")[1].split(".")[0])
        assert index >= skip_layers


def test_lora_count_for_every_projection(block_type):
    targets = ("q", "k", "v", "out", "fc1", "fc2")
    model = make_clip(block_type)
    handle = apply_pet(model, pet_config("lora", rank=3, targets=targets))
    assert handle.num_trainable() == _count_clip("lora", WIDTH, 3, 0, 0, LAYERS, lora_targets=targets)


def test_train_extra_and_filter_fn():
    model = make_clip()
    handle = apply_pet(model, pet_config("adapter", rank=8, train_extra=("visual.proj", "*.ln_post.*")),
                       filter_fn=lambda name, module: name.startswith("visual."))
    assert all(n.startswith("visual.") for n in handle.modules)
    names = {n for n, _ in handle.named_parameters()}
    assert {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"} <= names
    extra = WIDTH * 32 + 2 * WIDTH
    assert handle.num_trainable() == _count_clip("adapter", WIDTH, 8, 0, 0, LAYERS, towers=1) + extra


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_pet_parameters(block_type, method):
    model = make_clip(block_type)
    handle = apply_pet(model, method_config(method, rank=8, heads=4, skip_layers=1))
    randomize(handle)
    images, text = clip_inputs()
    img, txt, scale = model(images, text)
    (img.square().sum() + txt.square().sum()).backward()
    assert_only_pet_parameters_got_gradients(model, handle)


def _state_equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_model_exactly(block_type, method):
    model = make_clip(block_type)
    model.visual.proj.requires_grad_(False)  # an unusual flag, to check flags come back as they were
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, text = clip_inputs()
    ref = clip_out(model, images, text)
    handle = apply_pet(model, method_config(method, rank=8, heads=4, targets=("q", "v", "out", "fc2")
                                        if method == "lora" else None))
    assert _state_equal(handle.base_state_dict(), state)
    assert set(handle.pet_state_dict()).isdisjoint(state)
    randomize(handle)
    handle.remove()
    assert _state_equal(model.state_dict(), state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == classes
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
    out = clip_out(model, images, text)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    with pytest.raises(RuntimeError):
        handle.remove()


@pytest.mark.parametrize("targets", [("q", "k", "v"), ("in_proj", "out"), ("v", "fc1", "fc2")])
def test_lora_merge_matches_unmerged(block_type, targets):
    model = make_clip(block_type)
    images, text = clip_inputs()
    handle = apply_pet(model, pet_config("lora", rank=4, alpha=8, targets=targets))
    randomize(handle, std=0.1)
    before = clip_out(model, images, text)
    keys = list(handle.base_state_dict())
    untouched = {k: v.clone() for k, v in handle.base_state_dict().items()}
    merged = handle.merge()
    assert merged is model
    after = clip_out(model, images, text)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys
    changed = [k for k in keys if not torch.equal(model.state_dict()[k], untouched[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    assert not any(p.requires_grad is False for p in model.parameters())


def test_vlpet_cannot_merge():
    model = make_clip()
    handle = apply_pet(model, pet_config("vlpet-large", rank=8))
    with pytest.raises(NotImplementedError):
        handle.merge()
    handle.remove()


def test_pet_state_dict_round_trip():
    model = make_clip()
    handle = apply_pet(model, pet_config("vlpet-middle-x", rank=8, skip_layers=1))
    randomize(handle)
    saved = {k: v.clone() for k, v in handle.pet_state_dict().items()}
    images, text = clip_inputs()
    out = clip_out(model, images, text)
    other = make_clip()
    handle2 = apply_pet(other, pet_config("vlpet-middle-x", rank=8, skip_layers=1))
    handle2.load_pet_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(clip_out(other, images, text), out))
    with pytest.raises(KeyError):
        handle2.load_pet_state_dict({})


def test_patched_blocks_run_pet_and_get_their_forward_back():
    from skipkernels.patch import patch_clip
    from skipkernels.ops.block import held_plan, routed_plan
    model = patch_clip(make_clip())

    def routes():  # each block's route, by position in the model's one plan
        plans = held_plan(model).image.plans + held_plan(model).text.plans
        return {b.name: plans.index(routed_plan(b.module)) for b in find_blocks(model)}
    patched = routes()
    images, text = clip_inputs()
    handle = apply_pet(model, pet_config("lora", rank=4, targets=("q", "fc1"), skip_layers=1))
    randomize(handle)
    out = clip_out(model, images, text)
    plain = make_clip()
    handle2 = apply_pet(plain, pet_config("lora", rank=4, targets=("q", "fc1"), skip_layers=1))
    handle2.load_pet_state_dict(handle.pet_state_dict())
    for a, b in zip(out, clip_out(plain, images, text)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert routes() == patched  # PET's modules come in as hooks: the blocks stay routed
    handle.remove()
    assert routes() == patched


def test_gradient_checkpointing_blocks(block_type):
    model = make_clip(block_type)
    handle = apply_pet(model, pet_config("vlpet-large", rank=8))
    randomize(handle)
    images, text = clip_inputs()
    ref = clip_out(model, images, text)
    model.set_grad_checkpointing(True)
    model.train()
    img, txt, _ = model(images, text)
    torch.testing.assert_close(img, ref[0])
    torch.testing.assert_close(txt, ref[1])
    img.sum().backward()
    assert all(p.grad is not None for p in model.visual.transformer.resblocks[-1].pet_attn.parameters())


def test_config_validation_and_modes():
    with pytest.raises(ValueError):
        pet_config("prefix")
    with pytest.raises(ValueError):
        pet_config("adapter", targets=("q",))
    cfg = trainable_modules_for_mode("vlpet", skip_layers=6)
    assert cfg.method == "vlpet-large" and cfg.skip_layers == 6
    assert trainable_modules_for_mode("lora", rank=2).rank == 2
    assert pet_config("vlpet-small").rank_for(768) == 96
    assert pet_config("vlpet-small").rank_for(512) == 64
    assert pet_config("lora").rank_for(768) == 4
    with pytest.raises(ValueError):
        apply_pet(make_clip(), pet_config("adapter", skip_layers=LAYERS))
    with pytest.raises(ValueError):
        apply_pet(nn.Sequential(nn.Linear(4, 4)), pet_config("lora"))


# ------------------------------------------------------------------------------- training

def _classification_task(seed=0, n=8, classes=4):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    labels = torch.arange(n) % classes
    prompts = torch.zeros(classes, CONTEXT, dtype=torch.long)
    prompts[:, :6] = torch.randint(1, EOT, (classes, 6), generator=gen)
    prompts[:, 5] = EOT
    return images, labels, prompts


@pytest.mark.parametrize("method", METHODS)
def test_sgd_steps_lower_the_loss(method):
    model = make_clip("default")
    images, labels, prompts = _classification_task()
    handle = apply_pet(model, method_config(method, rank=8, heads=4, skip_layers=1))
    model.train()
    lr = {"lora": 0.05}.get(method, 0.02)
    opt = torch.optim.SGD(handle.parameters(), lr=lr, momentum=0.9)

    def loss_fn():
        img = nn.functional.normalize(model.encode_image(images), dim=-1)
        txt = nn.functional.normalize(model.encode_text(prompts), dim=-1)
        return nn.functional.cross_entropy(20.0 * img @ txt.T, labels)

    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_fn().item()
    assert final < losses[0] - 0.05, (losses, final)


def test_has_pet_and_no_second_application():
    from skipkernels.pet import has_pet
    model = make_clip()
    assert not has_pet(model)
    handle = apply_pet(model, pet_config("lora", rank=2, skip_layers=2))
    assert has_pet(model)
    blocks = model.visual.transformer.resblocks
    assert has_pet(blocks[2]) and not has_pet(blocks[1])
    with pytest.raises(ValueError):
        apply_pet(model, pet_config("adapter"))
    handle.remove()
    assert not has_pet(model)
    apply_pet(model, pet_config("adapter")).remove()


def test_one_config_type_per_method_each_registered_to_its_injector():
    from skipkernels.pet import AdapterConfig, LoRAConfig, PetConfig, VLPETConfig
    from skipkernels.pet.inject import INJECTORS
    for method in METHODS:
        config = pet_config(method)
        assert config.method == method and type(config) in INJECTORS
    assert type(pet_config("vlpet-middle-y")) is VLPETConfig and pet_config("vlpet-middle-y").granularity == "middle_y"
    assert type(pet_config("adapter")) is AdapterConfig and type(pet_config("lora")) is LoRAConfig
    with pytest.raises(TypeError, match="LoRAConfig \\(lora\\) has no field 'heads'"):
        pet_config("lora", heads=4)
    with pytest.raises(TypeError, match="PetConfig is the base"):
        PetConfig()
    with pytest.raises(ValueError, match="unknown VL-PET granularity"):
        VLPETConfig("huge")
    with pytest.raises(ValueError, match="unknown PET method"):
        pet_config("prefix")


def test_a_method_config_takes_its_own_fields_first():
    from skipkernels.pet import AdapterConfig, LoRAConfig, VLPETConfig
    assert VLPETConfig("small", skip_layers=6).granularity == "small"
    assert AdapterConfig(8).rank == 8 and LoRAConfig(2, 4).alpha == 4
