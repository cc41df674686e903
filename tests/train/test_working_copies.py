"""Working copies of the GEMM weights (skipkernels/train/working_copies.py): training with them is
bit-identical to autocast's per-step casts (weights and momentum, two epochs with an lr change, a
resume in between, the compiled step, both places of the update), the forward casts no GEMM weight,
a frozen weight is cast once an epoch, a master changed by another hand is seen, the step's peak
grows by at most one GEMM's gradient, and the choice is off with its reason where the copies save nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_clip
from train_runs import assert_identical, few_shot_items, train, trained_state
from skipkernels import SkipConfig, SkipTuner, distributed
from skipkernels.train import step as step_module
from skipkernels.train.memory import CpuAllocatorPeak
from skipkernels.train.step import EagerStep, StepUnavailable, choose_working_copies
from skipkernels.train.trainer import TrainConfig

BF16 = torch.bfloat16
# warm-up epoch at 1e-3, then the base rate: an lr change between the two epochs; bf16 autocast on
# the CPU, where the copies are on by default
FAST = dict(batch_size=2, lr=3e-2, lr_image=3e-2, shots=4, same_class_batches=False, warmup_epochs=1,
            warmup_lr=1e-2, progress=False, amp="bf16", epochs=2)


def _tuner(names, tokenizer, mode="skip", layers=2):
    return SkipTuner(tiny_clip(layers=layers), names, tokenizer,
                     SkipConfig(mode=mode, skip_layers=1 if mode in ("skip", "lskip-lora") else None, top_ratio=0.5),
                     seed=1)


@pytest.mark.parametrize("mode,update", [("skip", "auto"), ("skip", "off"), ("lora", "auto"), ("coop", "auto")])
def test_bit_identical_to_autocast_over_two_epochs_with_an_lr_change(mode, update, synthetic_root, tokenizer):
    names, items = few_shot_items(synthetic_root)
    cast = train(_tuner(names, tokenizer, mode), items, FAST, working_copies="off", update_in_backward=update)
    kept = train(_tuner(names, tokenizer, mode), items, FAST, update_in_backward=update)  # the default: on
    assert not cast.working_copies_choice.on and kept.working_copies_choice.on
    assert kept.history[0]["lr"] != kept.history[1]["lr"]
    assert_identical(trained_state(cast), trained_state(kept))
    start = {n: p.detach().clone() for n, p in _tuner(names, tokenizer, mode).trainable_named_parameters()}
    assert any(not torch.equal(p, start[n]) for n, p in trained_state(kept)[0].items())  # it trained


def test_a_resume_in_between_is_bit_identical(synthetic_root, tokenizer, tmp_path):
    names, items = few_shot_items(synthetic_root)
    whole = train(_tuner(names, tokenizer), items, FAST, working_copies="off")
    train(_tuner(names, tokenizer), items, FAST, tmp_path, stop_after_epochs=1, working_copies="on")
    resumed = train(_tuner(names, tokenizer), items, FAST, tmp_path, working_copies="on")
    assert resumed.start_epoch == 1 and len(resumed.history) == 2
    assert_identical(trained_state(whole), trained_state(resumed))


def test_the_compiled_step_is_bit_identical(synthetic_root, tokenizer, monkeypatch):
    compile_ = torch.compile  # tracing and autograd without inductor's code generation (minutes here)
    monkeypatch.setattr(step_module.torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": "aot_eager"}))
    names, items = few_shot_items(synthetic_root)
    cast = train(_tuner(names, tokenizer), items, FAST, step="compiled", working_copies="off")
    kept = train(_tuner(names, tokenizer), items, FAST, step="compiled")
    assert kept.step_choice.kind == "compiled" and kept.working_copies_choice.on
    assert_identical(trained_state(cast), trained_state(kept))


class _WeightCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts conversions to bf16 of the tensors in ``watched`` (by storage)."""

    def __init__(self, watched):
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for t in watched}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            target = kwargs.get("dtype") if func is torch.ops.aten._to_copy.default else args[0].dtype
            if target == BF16 and source.dtype == torch.float32 and \
                    source.untyped_storage().data_ptr() in self.watched:
                self.count += 1
        return func(*args, **kwargs)


def _gemm_masters(tuner, start):
    """The GEMM parameters the step's blocks read (a weight computed at each read, such as LoRA's
    W + BA on a packed in-projection, is no parameter and keeps autocast's cast)."""
    return [t for tower in (tuner.towers.image, tuner.towers.text) for plan in tower.plans[start:]
            for t in plan.gemm_weights() if isinstance(t, torch.nn.Parameter)]


@pytest.mark.parametrize("mode", ["skip", "lora"])
def test_the_forward_casts_no_gemm_weight_and_frozen_ones_are_cast_once(mode, synthetic_root, tokenizer):
    names, _ = few_shot_items(synthetic_root)
    tuner = _tuner(names, tokenizer, mode)
    start = tuner.skip_layers
    masters = _gemm_masters(tuner, start)
    trained = [t for t in masters if t.requires_grad]
    frozen = [t for t in masters if not t.requires_grad]
    assert (mode == "skip") == (not frozen) and (mode == "lora") == (not trained)
    optimizer = torch.optim.SGD(tuner.parameter_groups(1e-2, 1e-2, 5e-4), lr=1e-2, momentum=0.9)
    step = EagerStep(tuner, optimizer, BF16, working_copies=True, update_in_backward=True)
    inputs = tuner.image_prefix(torch.randn(2, 3, 32, 32)).detach() if tuner.plan.caches_prefix else \
        torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0, 1])
    step(inputs, labels)  # every copy is written before the forward, the trained ones again by their update
    written = step.working_copies.casts
    assert written == len(masters) + len(trained)
    counter = _WeightCasts(masters)
    with counter:
        step(inputs, labels)
    # each trained tensor's copy is written once, by its update; nothing else is cast
    assert counter.count == len(trained)
    assert step.working_copies.casts - written == len(trained)
    # the copies hold exactly autocast's cast of the updated masters
    copies = step.working_copies.copies
    assert all(torch.equal(copies[id(t)], t.detach().to(BF16)) for t in masters)


def test_a_master_changed_between_steps_is_seen(synthetic_root, tokenizer):
    names, _ = few_shot_items(synthetic_root)
    tuners = [_tuner(names, tokenizer, "lora") for _ in range(2)]
    steps = []
    for tuner, copies in zip(tuners, (True, False)):
        optimizer = torch.optim.SGD(tuner.parameter_groups(1e-2, 1e-2, 5e-4), lr=1e-2, momentum=0.9)
        steps.append(EagerStep(tuner, optimizer, BF16, working_copies=copies))
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for tuner, step in zip(tuners, steps):
        step(images, labels)
        frozen = next(t for t in _gemm_masters(tuner, 0) if not t.requires_grad)
        with torch.no_grad():
            frozen.mul_(3.0)  # a frozen weight changed by another hand
    losses = [step(images, labels) for step in steps]
    assert torch.equal(losses[0], losses[1])


def test_the_step_peak_does_not_grow(synthetic_root, tokenizer):
    """The copies replace the casts autocast holds for the backward: the peak grows by no more than
    one GEMM's gradient."""
    names, _ = few_shot_items(synthetic_root)
    open_clip = pytest.importorskip("open_clip")

    def peak(copies):
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=16, width=256,
                                                              head_width=64, layers=3),
                               text_cfg=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=3))
        tuner = SkipTuner(model, names[:4], tokenizer, SkipConfig(mode="skip", skip_layers=1, top_ratio=1.0), seed=1)
        with torch.no_grad():
            tokens = tuner.image_prefix(torch.randn(2, 3, 32, 32))
        optimizer = torch.optim.SGD(tuner.parameter_groups(1e-3, 1e-3, 5e-4), lr=1e-3, momentum=0.9)
        step = EagerStep(tuner, optimizer, BF16, update_in_backward=True, working_copies=copies)
        step(tokens, torch.tensor([0, 1]))  # momentum buffers (and copies) exist from here on
        with CpuAllocatorPeak() as probe:
            step(tokens, torch.tensor([0, 1]))
        held = step.working_copies.nbytes() if copies else 0
        return probe.peak_bytes, held

    (cast, _), (kept, held) = peak(False), peak(True)
    assert held > 0
    # CpuAllocatorPeak counts what the window allocates: the copies, made before it, are added back.
    # At the forward's end both hold every cast; autocast frees its casts during the backward, the
    # copies stay, so where the peak falls in the backward (weights dominate this step) it may sit
    # higher by the gradient of one GEMM in flight, fp32 and bf16: 6 B per element of the largest.
    largest = 256 * 1024
    assert kept + held <= cast + 6 * largest, (cast, kept, held)
    print(f"peak with autocast's casts {cast} B; with copies {kept} B + {held} B of copies")


def test_off_with_its_reason_where_it_saves_nothing(monkeypatch):
    assert "no autocast" in choose_working_copies("auto", "eager", None).reason
    assert not choose_working_copies("auto", "graph", BF16).on
    with pytest.raises(StepUnavailable, match="working_copies='on' cannot run this training: no autocast"):
        choose_working_copies("on", "eager", None)
    assert choose_working_copies("off", "eager", BF16).reason == "asked for"
    assert choose_working_copies("auto", "compiled", BF16).on
    monkeypatch.setattr(distributed, "enabled", lambda: True)
    assert choose_working_copies("auto", "eager", BF16).on  # DDP: the masters still get every gradient
    with pytest.raises(ValueError, match="working_copies must be one of"):
        TrainConfig(working_copies="sometimes")


@pytest.mark.slow
def test_two_ranks_under_ddp_are_bit_identical(synthetic_root, tmp_path):
    """DistributedDataParallel all-reduces the masters' gradients (the copies hand theirs over
    through the cast's backward) and optimizer.step() writes the copies after: weights and
    momentum equal training without copies, on two gloo ranks."""
    out = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(Path(__file__).parents[1] / "support" / "ddp_working_copies.py"), str(synthetic_root), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["choices"]["on"].startswith("on (") and result["same"], result
