"""PET modules on the op layer's one route through a block (``BlockHooks``), with pruning where exact."""
import pytest
import torch

from conftest import tiny_clip
from skipkernels import patch_clip, unpatch_clip
from skipkernels.ops.block import NO_HOOKS, block_forward, held_plan, routed_plan
from skipkernels.pet import apply_pet, block_hooks, has_pet, pet_config
from skipkernels.skip import towers

ALL_PROJECTIONS = ("q", "k", "v", "out", "fc1", "fc2")
CONFIGS = {
    "vlpet-large": pet_config("vlpet-large", rank=8, heads=2),
    "vlpet-middle-x": pet_config("vlpet-middle-x", rank=8, heads=2),
    "vlpet-middle-y": pet_config("vlpet-middle-y", rank=8, heads=2),
    "vlpet-small": pet_config("vlpet-small", rank=8, heads=2),
    "adapter": pet_config("adapter", rank=8),
    "lora": pet_config("lora", rank=4, targets=ALL_PROJECTIONS),
}


def _with_pet(method, block, seed=0):
    """A tiny CLIP with ``method``'s modules in every block, their parameters random (not the
    identity they start as), so a module the route skipped would show."""
    model = tiny_clip(block, seed=seed)
    handle = apply_pet(model, CONFIGS[method])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in handle.pet_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval(), handle


def _close(a, b):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= 2e-5 * scale + 1e-6


@pytest.mark.parametrize("block", ["default", "custom"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_hooked_route_equals_open_clip_with_pet(method, block, tokenizer):
    """Image and text features through ``towers`` (block_forward with hooks, last block pruned
    where exact) equal open_clip's forward with PET's modules (clip_block_forward)."""
    model, _ = _with_pet(method, block)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    tokens = tokenizer(["a photo of a cat.", "a red circle on a very long sentence", "dog"])
    with torch.no_grad():
        expected_image, expected_text = model.encode_image(images), model.encode_text(tokens)
        assert all(block_hooks(b) is not None for b in model.visual.transformer.resblocks)
        plan = towers.ModelPlan(model)
        _close(plan.image.encode(images), expected_image)
        _close(plan.text.encode(tokens), expected_text)
        patch_clip(model)  # the patched forwards take the same route
        _close(model.encode_image(images), expected_image)
        x = plan.image.stem(images)
        _close(model.visual.transformer.resblocks[0](x), block_forward(model.visual.transformer.resblocks[0], x,
                                                                        hooks=block_hooks(model.visual.transformer.resblocks[0])))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_last_block_pruning_follows_the_modules(method, tokenizer):
    """Pruning stays on where every module reads its own token row, and goes off with the reason
    where one reads every token (VL-PET's small gate)."""
    model, _ = _with_pet(method, "default")
    plan = towers.ModelPlan(model)
    reason = plan.image.pruning_off_reason()
    if method == "vlpet-small":
        assert reason is not None and "small gate" in reason
        assert not block_hooks(model.visual.transformer.resblocks[-1]).row_wise
    else:
        assert reason is None
    block = model.visual.transformer.resblocks[-1]
    hooks = block_hooks(block)
    x = torch.randn(2, 5, 64)
    index = torch.tensor([0, 3])
    with torch.no_grad():
        full = block_forward(block, x, hooks=hooks)[torch.arange(2), index].unsqueeze(1)
        if hooks.row_wise:
            _close(block_forward(block, x, query_index=index, hooks=hooks), full)
        else:
            with pytest.raises(ValueError, match="every token row"):
                block_forward(block, x, query_index=index, hooks=hooks)
        # the tower plan never prunes a block whose hooks forbid it: it slices after the full block
        depth = len(plan.image)
        _close(plan.image.run(x, depth - 1, depth, prune_index=index), full)


def test_without_hooks_a_pet_block_would_differ():
    """The hooks carry the modules: the same block without them computes the base model."""
    model, _ = _with_pet("vlpet-large", "default")
    block = model.visual.transformer.resblocks[1]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert (block_forward(block, x, hooks=block_hooks(block)) - block_forward(block, x, hooks=NO_HOOKS)).abs().max() > 1e-3


def test_pet_on_a_patched_model_keeps_the_patched_forward_and_undoes_cleanly():
    model = patch_clip(tiny_clip())
    block = model.visual.transformer.resblocks[1]
    handle = apply_pet(model, CONFIGS["vlpet-middle-x"])
    # PET hands its modules in as hooks: the block stays routed through the model's plan
    assert routed_plan(block) is held_plan(model).image.plans[1] and routed_plan(block).hooks.attn is not None
    handle.remove()
    assert routed_plan(block) is held_plan(model).image.plans[1] and routed_plan(block).hooks == NO_HOOKS
    assert block_hooks(block) == NO_HOOKS
    # PET first, then patch_clip, then remove: the patched route stays
    model = tiny_clip()
    handle = apply_pet(model, CONFIGS["lora"])
    patch_clip(model)
    block = model.visual.transformer.resblocks[1]
    assert routed_plan(block) is held_plan(model).image.plans[1]
    handle.remove()
    assert routed_plan(block) is held_plan(model).image.plans[1] and not has_pet(block)
    unpatch_clip(model)
    assert "forward" not in model.visual.transformer.resblocks[1].__dict__


def test_modules_the_route_would_not_apply_send_the_block_to_its_own_forward():
    """A LoRA on a projection the op layer reads as a tensor without a hook (here the MLP of a
    block under an unknown name) makes block_hooks refuse, so nothing is silently skipped."""
    from skipkernels.pet.modules import LoRAFactors, install_linear_lora
    model = tiny_clip()
    block = model.visual.transformer.resblocks[0]
    extra = torch.nn.Sequential(torch.nn.Linear(64, 64))
    block.add_module("extra", extra)
    install_linear_lora(extra[0], LoRAFactors(64, 64, 2))
    assert block_hooks(block) is None


def test_unpatching_keeps_the_pet_modules_and_remove_then_restores_open_clip():
    model, handle = _with_pet("vlpet-large", "default")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.encode_image(images)
        patch_clip(model)
        unpatch_clip(model)
        _close(model.encode_image(images), expected)  # the modules still apply
        handle.remove()
        assert not any("forward" in b.__dict__ for b in model.visual.transformer.resblocks)
        plain = tiny_clip("default", seed=0).eval()
        torch.testing.assert_close(model.encode_image(images), plain.encode_image(images), rtol=0, atol=0)
