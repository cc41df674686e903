"""The Trainer's step kinds on a GPU (skipkernels/train/step.py): auto picks the CUDA-graph step,
which trains the eager step's weights within rounding over two epochs with a learning-rate change,
captures once per learning rate (not per step), and synchronises with the host only at read-backs."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import tiny_clip  # noqa: E402
from skipkernels import SkipConfig, SkipTuner, _ext  # noqa: E402
from skipkernels.data.coop import load_splits  # noqa: E402
from skipkernels.data.fewshot import sample_few_shot  # noqa: E402
from skipkernels.train.trainer import TrainConfig, Trainer  # noqa: E402

FAST = dict(batch_size=2, lr=3e-3, lr_image=3e-3, shots=4, same_class_batches=False, warmup_epochs=1,
            warmup_lr=1e-3, progress=False, epochs=2)


def _trainer(synthetic_root, tokenizer, step, amp=None, **config):
    splits = load_splits(synthetic_root, "synthetic")
    tuner = SkipTuner(tiny_clip(layers=2).cuda(), splits.classnames, tokenizer,
                      SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5), seed=1)
    return Trainer(tuner, sample_few_shot(splits.train, 4, seed=1),
                   TrainConfig(step=step, amp=amp, **{**FAST, **config}))


@pytest.mark.skipif(not _ext.CUDA_BUILT, reason="compiled CUDA ops not built")
def test_auto_is_graph_and_trains_the_eager_weights(synthetic_root, tokenizer):
    eager = _trainer(synthetic_root, tokenizer, "eager")
    graph = _trainer(synthetic_root, tokenizer, "auto")
    assert graph.step_choice.kind == "graph", graph.step_choice
    eager.train()
    graph.train()
    assert graph.train_step.captures == 2  # one per learning rate: the warm-up epoch, then the base rate
    assert len(graph.steps) > 2 * graph.train_step.captures
    for (name, a), (_, b) in zip(eager.tuner.trainable_named_parameters(), graph.tuner.trainable_named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    _ext.check_cuda_errors()


@pytest.mark.skipif(not _ext.CUDA_BUILT, reason="compiled CUDA ops not built")
@pytest.mark.parametrize("step", ["graph", "compiled"])
def test_the_static_steps_do_not_synchronise(synthetic_root, tokenizer, step):
    trainer = _trainer(synthetic_root, tokenizer, step, amp="bf16", epochs=1, warmup_epochs=0, log_every=1000)
    inner = trainer.train_step
    calls = [0]

    def strict(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= 2:  # the first calls capture or compile, which may synchronise
            return inner(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    strict.kind, strict.epoch_started = inner.kind, inner.epoch_started
    trainer.train_step = strict
    trainer.train()
    assert calls[0] >= 4 and all(torch.isfinite(torch.tensor(s["loss"])) for s in trainer.steps)


@pytest.mark.skipif(not _ext.CUDA_BUILT, reason="compiled CUDA ops not built")
def test_auto_takes_the_compiled_step_where_the_graph_would_not_leave_room(synthetic_root, tokenizer, monkeypatch):
    roomy = _trainer(synthetic_root, tokenizer, "auto")
    assert roomy.step_choice.kind == "graph", roomy.step_choice
    left = roomy._memory_left_for_steps()
    trainable = sum(p.numel() * 4 for _, p in roomy.tuner.trainable_named_parameters())
    assert 0 < left < torch.cuda.mem_get_info()[0] + 2 ** 30
    free, total = torch.cuda.mem_get_info()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free - left + 3 * trainable, total))
    tight = _trainer(synthetic_root, tokenizer, "auto")
    assert tight.step_choice.kind == "compiled" and "graph is possible, but" in tight.step_choice.reason
