"""Working copies of the GEMM weights on a GPU (skipkernels/train/working_copies.py): on by default
for the eager and compiled steps under bf16 autocast, off for the graph step; training with them
matches autocast's casts over two epochs with a learning-rate change (bit-identical on CPU; here
within the rounding of kernels that sum with atomics), the copies hold the masters' bf16 bits, and
the forward casts no GEMM weight."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import tiny_clip  # noqa: E402
from skipkernels import SkipConfig, SkipTuner, _ext  # noqa: E402
from skipkernels.data.coop import load_splits  # noqa: E402
from skipkernels.data.fewshot import sample_few_shot  # noqa: E402
from skipkernels.train.trainer import TrainConfig, Trainer  # noqa: E402

FAST = dict(batch_size=2, lr=3e-2, lr_image=3e-2, shots=4, same_class_batches=False, warmup_epochs=1,
            warmup_lr=1e-2, progress=False, epochs=2, amp="bf16")


def _trainer(synthetic_root, tokenizer, mode="skip", **config):
    splits = load_splits(synthetic_root, "synthetic")
    tuner = SkipTuner(tiny_clip(layers=2).cuda(), splits.classnames, tokenizer,
                      SkipConfig(mode=mode, skip_layers=1 if mode == "skip" else None, top_ratio=0.5), seed=1)
    return Trainer(tuner, sample_few_shot(splits.train, 4, seed=1), TrainConfig(**{**FAST, **config}))


@pytest.mark.parametrize("mode", ["skip", "lora"])
def test_eager_with_copies_trains_autocast_weights(mode, synthetic_root, tokenizer):
    cast = _trainer(synthetic_root, tokenizer, mode, step="eager", working_copies="off")
    kept = _trainer(synthetic_root, tokenizer, mode, step="eager")
    assert kept.working_copies_choice.on, kept.working_copies_choice
    cast.train()
    kept.train()
    for (name, a), (_, b) in zip(cast.tuner.trainable_named_parameters(), kept.tuner.trainable_named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    _ext.check_cuda_errors()


def test_copies_written_by_the_update_hold_the_masters_bf16_bits(synthetic_root, tokenizer):
    from skipkernels.train.step import EagerStep
    splits = load_splits(synthetic_root, "synthetic")
    tuner = SkipTuner(tiny_clip(layers=2).cuda(), splits.classnames, tokenizer,
                      SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5), seed=1)
    optimizer = torch.optim.SGD(tuner.parameter_groups(1e-2, 1e-2, 5e-4), lr=1e-2, momentum=0.9)
    step = EagerStep(tuner, optimizer, torch.bfloat16, update_in_backward=True, working_copies=True)
    with torch.no_grad():
        inputs = tuner.image_prefix(torch.randn(2, 3, 32, 32, device="cuda"))
    for _ in range(2):
        step(inputs, torch.tensor([0, 1]))
    working = step.working_copies
    assert working.copies and all(m.requires_grad for m in working.masters.values())
    for key, copy in working.copies.items():  # the second step's update wrote each of them
        assert torch.equal(copy, working.masters[key].detach().to(torch.bfloat16))
        assert working.versions[key] == working.masters[key]._version
    _ext.check_cuda_errors()


@pytest.mark.skipif(not _ext.CUDA_BUILT, reason="compiled CUDA ops not built")
def test_auto_keeps_them_off_for_the_graph_step(synthetic_root, tokenizer):
    graph = _trainer(synthetic_root, tokenizer)
    assert graph.step_choice.kind == "graph" and not graph.working_copies_choice.on
    assert "capture" in graph.working_copies_choice.reason
