"""PET methods inside SkipTuner and the trainer, alone and combined with LSkip."""
import pytest
import torch

from conftest import tiny_clip
from skipkernels import SkipTuner
from skipkernels.skip.tuner import PET_MODES, SkipConfig
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune

CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "cat", "dog"]


@pytest.mark.parametrize("method", PET_MODES)
@pytest.mark.parametrize("lskip", [False, True])
def test_pet_modes_start_at_the_base_model_and_train_only_their_modules(method, lskip, tokenizer):
    mode = f"lskip-{method}" if lskip else method
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 3, 5])
    base = SkipTuner(tiny_clip(seed=5), CLASSES, tokenizer, SkipConfig(mode="lskip" if lskip else "ft", skip_layers=1))
    tuner = SkipTuner(tiny_clip(seed=5), CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=1))
    inputs = tuner.image_prefix(images) if lskip else images
    with torch.no_grad():
        expected = base.loss(base.image_prefix(images) if lskip else images, labels)
    loss = tuner.loss(inputs, labels)
    assert torch.allclose(loss, expected, rtol=1e-5)  # zero-initialised up-projections: identity
    trainable = [n for n, _ in tuner.trainable_named_parameters()]
    assert trainable and all(("pet_" in n or "lora" in n) for n in trainable)
    if lskip:  # modules only in blocks >= omega
        assert not any(".resblocks.0." in n for n in trainable)
    optimizer = torch.optim.SGD([p for _, p in tuner.trainable_named_parameters()], lr=0.5)
    first = None
    for _ in range(8):
        optimizer.zero_grad()
        loss = tuner.loss(inputs, labels)
        first = loss.item() if first is None else first
        loss.backward()
        assert all(p.grad is None for n, p in tuner.model.named_parameters() if n.startswith("visual.conv1"))
        optimizer.step()
    assert loss.item() < first


def test_lskip_lora_run_exports_a_plain_open_clip_model(synthetic_root, tmp_path, open_clip):
    from skipkernels.models import open_clip_module
    open_clip_module()
    results = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="lskip-lora", skip_layers=2),
                       train=TrainConfig(epochs=1, batch_size=8, lr=3e-3, lr_image=3e-3, shots=4,
                                         same_class_batches=False, warmup_epochs=0, progress=False),
                       out_dir=tmp_path)
    assert results["finished"]
    model = open_clip.create_model("skipkernels-tiny", pretrained=str(tmp_path / "model.pt"))
    assert not any("lora" in k for k in model.state_dict())
    assert not (tmp_path / "pet.pt").exists()  # folded: model.pt is the whole tuned model


def test_plans_follow_apply_merge_and_remove():
    """The model's one plan is built again when PET modules come and go: the patched blocks are
    routed through block plans with the new hooks, and the tower plans (the same objects) see them."""
    from skipkernels import patch_clip
    from skipkernels.ops.block import NO_HOOKS, held_plan, routed_plan
    from skipkernels.pet import apply_pet, has_pet, pet_config
    model = patch_clip(tiny_clip(layers=3))
    blocks = list(model.visual.transformer.resblocks)
    towers = held_plan(model)
    image = towers.image

    def routed_hooks():
        return [routed_plan(b).hooks for b in blocks]
    assert all(h == NO_HOOKS for h in routed_hooks())
    handle = apply_pet(model, pet_config("vlpet-small", skip_layers=1))
    assert held_plan(model) is towers and towers.image is image
    assert [has_pet(b) for b in blocks] == [False, True, True]
    assert [h.attn is not None for h in routed_hooks()] == [False, True, True]
    assert [routed_plan(b) for b in blocks] == towers.image.plans
    assert towers.image.pruning_off_reason() == "a PET module of the last block reads every token (VL-PET's small gate)"
    assert [p.hooks.attn is not None for p in towers.image.plans] == [False, True, True]
    handle.remove()
    assert all(h == NO_HOOKS for h in routed_hooks()) and towers.image.pruning_off_reason() is None
    handle = apply_pet(model, pet_config("lora", skip_layers=2))
    handle.merge()
    assert not any(has_pet(b) for b in blocks) and all(h == NO_HOOKS for h in routed_hooks())