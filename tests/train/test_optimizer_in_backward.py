"""The optimizer update inside backward (skipkernels/train/step.py BackwardUpdate): bit-identical
weights and momentum buffers to optimizer.step() across a learning-rate change and a resume, on by
default where it can run, refused with its reason where it cannot, and no gradient buffer held."""
import pytest
import torch

from conftest import tiny_clip
from train_runs import assert_identical, few_shot_items, train, trained_state
from skipkernels import SkipConfig, SkipTuner, distributed
from skipkernels.train import step as step_module
from skipkernels.train.memory import CpuAllocatorPeak
from skipkernels.train.step import EagerStep, StepUnavailable, choose_update
from skipkernels.train.trainer import TrainConfig

# warm-up epoch at 1e-3, then the base rate: an lr change between the two epochs
FAST = dict(batch_size=2, lr=3e-3, lr_image=3e-3, shots=4, same_class_batches=False, warmup_epochs=1,
            warmup_lr=1e-3, progress=False, amp=None, epochs=2)


def _tuner(names, tokenizer, mode="skip"):
    return SkipTuner(tiny_clip(layers=2), names, tokenizer, SkipConfig(mode=mode, skip_layers=1, top_ratio=0.5), seed=1)


@pytest.mark.parametrize("mode", ["skip", "ft"])
def test_update_in_backward_is_bit_identical_over_two_epochs_with_an_lr_change(mode, synthetic_root, tokenizer):
    names, items = few_shot_items(synthetic_root)
    after = train(_tuner(names, tokenizer, mode), items, FAST, update_in_backward="off")
    inside = train(_tuner(names, tokenizer, mode), items, FAST)  # the default
    assert not after.update_choice.in_backward and inside.update_choice.in_backward
    assert after.history[0]["lr"] != after.history[1]["lr"]
    assert_identical(trained_state(after), trained_state(inside))
    start = {n: p for n, p in tiny_clip(layers=2).named_parameters()}
    assert any(not torch.equal(p, start[n.split("model.", 1)[-1]]) for n, p in trained_state(inside)[0].items()
               if n.split("model.", 1)[-1] in start)  # it trained


def test_a_resume_in_between_is_bit_identical(synthetic_root, tokenizer, tmp_path):
    names, items = few_shot_items(synthetic_root)
    whole = train(_tuner(names, tokenizer), items, FAST, update_in_backward="off")
    train(_tuner(names, tokenizer), items, FAST, tmp_path, stop_after_epochs=1, update_in_backward="on")
    resumed = train(_tuner(names, tokenizer), items, FAST, tmp_path, update_in_backward="on")
    assert resumed.start_epoch == 1 and len(resumed.history) == 2
    assert_identical(trained_state(whole), trained_state(resumed))


def test_the_compiled_step_updates_in_backward_bit_identically(synthetic_root, tokenizer, monkeypatch):
    compile_ = torch.compile  # tracing and autograd without inductor's code generation (minutes here)
    monkeypatch.setattr(step_module.torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "aot_eager"}))
    names, items = few_shot_items(synthetic_root)
    after = train(_tuner(names, tokenizer), items, FAST, step="compiled", update_in_backward="off")
    inside = train(_tuner(names, tokenizer), items, FAST, step="compiled")
    assert inside.step_choice.kind == "compiled" and inside.update_choice.in_backward
    assert_identical(trained_state(after), trained_state(inside))


def _sgd(**kw):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, **kw)


def test_off_with_its_reason_where_it_cannot_run(monkeypatch):
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    choice = choose_update("auto", "eager", adam)
    assert not choice.in_backward and "Adam is not torch.optim.SGD" in choice.reason
    with pytest.raises(StepUnavailable, match="update_in_backward='on' cannot run this training: Adam"):
        choose_update("on", "eager", adam)
    choice = choose_update("auto", "graph", _sgd())
    assert not choice.in_backward and "static tensors of the capture" in choice.reason
    hooked = _sgd()
    hooked.register_step_post_hook(lambda *a: None)
    assert "step hooks" in choose_update("auto", "eager", hooked).reason
    monkeypatch.setattr(distributed, "enabled", lambda: True)
    choice = choose_update("auto", "eager", _sgd())
    assert not choice.in_backward and "all-reduce" in choice.reason
    assert choose_update("off", "eager", _sgd()).reason == "asked for"
    with pytest.raises(ValueError, match="update_in_backward must be one of"):
        TrainConfig(update_in_backward="sometimes")


def test_gradients_are_freed_and_other_backwards_keep_theirs(synthetic_root, tokenizer):
    names, _ = few_shot_items(synthetic_root)
    tuner = _tuner(names, tokenizer, "ft")
    optimizer = torch.optim.SGD(tuner.parameter_groups(1e-2, 1e-2, 5e-4), lr=1e-2, momentum=0.9)
    step = EagerStep(tuner, optimizer, None, update_in_backward=True)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    before = {n: p.detach().clone() for n, p in tuner.trainable_named_parameters()}
    step(images, labels)
    params = dict(tuner.trainable_named_parameters())
    assert all(p.grad is None for p in params.values())
    assert sum(not torch.equal(before[n], p) for n, p in params.items()) > len(params) // 2
    assert len(optimizer.state) > len(params) // 2  # momentum buffers, kept in the optimizer's state
    updated = {n: p.detach().clone() for n, p in params.items()}
    tuner.loss(images, labels).backward()  # outside the step: gradients stay, weights do not move
    assert all(torch.equal(updated[n], p) for n, p in params.items())
    assert sum(p.grad is not None for p in params.values()) > len(params) // 2


def _peak(update_in_backward, tuner, images, labels):
    optimizer = torch.optim.SGD(tuner.parameter_groups(1e-3, 1e-3, 5e-4), lr=1e-3, momentum=0.9)
    step = EagerStep(tuner, optimizer, None, update_in_backward=update_in_backward)
    step(images, labels)  # momentum buffers exist from here on
    optimizer.zero_grad(set_to_none=True)  # both windows start with no gradients held
    with CpuAllocatorPeak() as probe:
        step(images, labels)
    optimizer.zero_grad(set_to_none=True)
    return probe.peak_bytes


def test_the_gradient_buffer_is_gone_from_the_peak(synthetic_root, tokenizer):
    """Weights dominate this step (width 256, batch 1), as in a large model at a small batch: the
    peak falls by at least the trainable fp32 bytes less the largest tensor's."""
    names, _ = few_shot_items(synthetic_root)
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=16, width=256, head_width=64,
                                                          layers=2),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=2))
    tuner = SkipTuner(model, names[:4], tokenizer, SkipConfig(mode="skip", skip_layers=1, top_ratio=1.0), seed=1)
    with torch.no_grad():
        tokens = tuner.image_prefix(torch.randn(1, 3, 32, 32))  # LSkip: the step takes the cached prefix
    labels = torch.tensor([0])
    trainable = [p for _, p in tuner.trainable_named_parameters()]
    floor = sum(p.numel() * 4 for p in trainable) - max(p.numel() * 4 for p in trainable)
    after = _peak(False, tuner, tokens, labels)
    inside = _peak(True, tuner, tokens, labels)
    assert after is not None and inside is not None
    assert after - inside >= floor, (after, inside, floor)
    print(f"peak after backward {after} B, in backward {inside} B, floor {floor} B")


@pytest.mark.parametrize("options", [dict(nesterov=True), dict(maximize=True), dict(dampening=0.1),
                                     dict(weight_decay=0.0), dict(momentum=0.0)], ids=str)
def test_every_sgd_option_matches_optimizer_step_bit_for_bit(options):
    def run(in_backward):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
        settings = {"momentum": 0.9, "weight_decay": 1e-2, **options}
        optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                                     {"params": model[2].parameters()}], lr=0.1, **settings)
        update = step_module.BackwardUpdate(optimizer) if in_backward else None
        for i in range(3):
            optimizer.param_groups[1]["lr"] = 0.1 / (i + 1)
            optimizer.zero_grad(set_to_none=True)
            loss = model(torch.randn(4, 8)).square().mean()
            if update is not None:
                update.backward(loss)
            else:
                loss.backward()
                optimizer.step()
        return model.state_dict(), {i: optimizer.state[p].get("momentum_buffer") for i, p in
                                    enumerate(model.parameters()) if p in optimizer.state}
    after, inside = run(False), run(True)
    assert all(torch.equal(after[0][k], inside[0][k]) for k in after[0])
    assert after[1].keys() == inside[1].keys()
    assert all((after[1][i] is None and inside[1][i] is None) or torch.equal(after[1][i], inside[1][i])
               for i in after[1])
