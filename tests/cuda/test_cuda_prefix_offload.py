"""Frozen prefix weights in pinned host memory between LSkip caching passes, on a GPU: the device
memory they held is freed after each caching pass (torch.cuda.memory_allocated drops by their
bytes), they come back bit for bit for the next pass and for evaluation, and training with the
offload equals training without it."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import tiny_clip  # noqa: E402
from skipkernels import SkipConfig, SkipTuner  # noqa: E402
from skipkernels.data.coop import load_splits  # noqa: E402
from skipkernels.data.fewshot import sample_few_shot  # noqa: E402
from skipkernels.train.trainer import TrainConfig, Trainer  # noqa: E402

FAST = dict(batch_size=2, lr=3e-3, lr_image=3e-3, shots=4, same_class_batches=False, warmup_epochs=1,
            warmup_lr=1e-3, progress=False, epochs=2)
# The CUDA caching allocator may hand out a cached block up to 1 MiB larger than asked for (it
# does not split off a remainder below that), and counts the whole block as allocated.
SLACK = 1 << 20


def _tuner(classnames, tokenizer, **config):
    return SkipTuner(tiny_clip(layers=2).cuda(), classnames, tokenizer,
                     SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5, **config), seed=1)


def _prefix_bytes(tuner) -> tuple[int, int]:
    parts = tuner.prefix_offload.values()
    return sum(part.nbytes for part in parts), sum(len(part.storages) for part in parts)


def test_memory_allocated_drops_by_the_prefix_bytes(synthetic_root, tokenizer):
    tuner = _tuner(load_splits(synthetic_root, "synthetic").classnames, tokenizer)
    assert tuner.prefix_offload_state.startswith("on (") and "pinned host memory" in tuner.prefix_offload_state
    nbytes, count = _prefix_bytes(tuner)
    assert nbytes > 0
    before = {n: t.detach().clone() for n, t in tuner.model.state_dict().items()}
    torch.cuda.synchronize()
    whole = torch.cuda.memory_allocated()
    tuner.offload_prefix()
    torch.cuda.synchronize()
    freed = whole - torch.cuda.memory_allocated()
    assert nbytes <= freed <= nbytes + SLACK * count, (freed, nbytes)
    assert all(copy.is_pinned() for part in tuner.prefix_offload.values() for copy in part.host)
    tuner.restore_prefix()
    torch.cuda.synchronize()
    assert abs(torch.cuda.memory_allocated() - whole) <= SLACK * count
    for name, value in tuner.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def _trainer(synthetic_root, tokenizer, step, offload, deterministic):
    splits = load_splits(synthetic_root, "synthetic")
    tuner = _tuner(splits.classnames, tokenizer, offload_prefix=offload)
    images = torch.randn(4, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def evaluate():  # the whole image tower, as the epochs' evaluation runs it
        with torch.no_grad():
            return tuner.encode_images(images).float().cpu()

    return Trainer(tuner, sample_few_shot(splits.train, 4, seed=1),
                   TrainConfig(step=step, deterministic=deterministic, **FAST), evaluate=evaluate)


# eager with deterministic algorithms: bit for bit. auto (the CUDA-graph or compiled step where they
# run): the same steps read no prefix weight, equal within the GPU's run-to-run rounding.
@pytest.mark.parametrize("step, deterministic", [("eager", True), ("auto", False)])
def test_training_with_offload_equals_training_without(synthetic_root, tokenizer, step, deterministic):
    plain = _trainer(synthetic_root, tokenizer, step, False, deterministic)
    offloaded = _trainer(synthetic_root, tokenizer, step, True, deterministic)
    assert offloaded.step_choice.kind == plain.step_choice.kind
    plain.config.eval_every = offloaded.config.eval_every = 1  # evaluates after epoch 1 of 2
    assert plain.tuner.prefix_offload_state == "off (turned off in the config)"
    plain.train()
    offloaded.train()
    assert not offloaded.tuner.prefix_offloaded  # whole again after training

    def same(a, b, name):
        if deterministic:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

    for (name, a), (_, b) in zip(plain.tuner.trainable_named_parameters(),
                                 offloaded.tuner.trainable_named_parameters()):
        same(a, b, name)
    momentum = [s["momentum_buffer"] for s in offloaded.optimizer.state_dict()["state"].values()]
    plain_momentum = [s["momentum_buffer"] for s in plain.optimizer.state_dict()["state"].values()]
    assert len(momentum) == len(plain_momentum) > 0
    for i, (a, b) in enumerate(zip(plain_momentum, momentum)):
        same(a, b, f"momentum {i}")
    same(torch.tensor([h["loss"] for h in plain.history]), torch.tensor([h["loss"] for h in offloaded.history]),
         "losses")
    same(plain.history[0]["accuracy"], offloaded.history[0]["accuracy"], "evaluation after epoch 1")
    a, b = plain.tuner.model.state_dict(), offloaded.tuner.model.state_dict()
    for k in a:  # the frozen prefix weights are the same bits on the device again
        same(a[k], b[k], k)
    # the steps ran without the prefix on the device: their peak is lower by about its bytes
    nbytes, count = _prefix_bytes(offloaded.tuner)
    drop = plain.peak_train_bytes - offloaded.peak_train_bytes
    assert 0.9 * nbytes <= drop <= nbytes + SLACK * count, (drop, nbytes)
