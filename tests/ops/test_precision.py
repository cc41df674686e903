"""Mixed precision and low/high-precision weights (CPU): torch.autocast around a step with every
backend, every mode under finetune --amp bf16/fp16, and models whose weights are bf16, fp16 or
fp64 through the Python API. Each case checks the numbers, not only that nothing raised."""
import math

import pytest
import torch

import skipkernels
from skipkernels import _ext
from skipkernels.cli import main
from skipkernels.skip.modes import MODES
from skipkernels.skip.tuner import SkipConfig, SkipTuner
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune

from conftest import tiny_clip

CLASSES = ["ant", "bee", "cow", "dog", "elk", "fox"]
BACKENDS = ["auto", "torch", "triton"] + (["cpu"] if _ext.COMPILED_OPS else [])


def _step(tuner, images, labels):
    tuner.model.zero_grad(set_to_none=True)
    inputs = tuner.image_prefix(images) if tuner.plan.caches_prefix else images
    loss = tuner.loss(inputs, labels)
    loss.backward()
    grads = [p.grad for p in tuner.parameters() if p.requires_grad]
    return loss, grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_around_a_step_with_every_backend(backend, dtype, tokenizer):
    """The compiled ops run below autocast in their inputs' dtypes (fp32 accumulation); the loss
    is fp32 and close to the fp32 step's."""
    images, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    reference = SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4)), CLASSES, tokenizer,
                          SkipConfig(skip_layers=2, top_count=6), policy="torch")
    want, _ = _step(reference, images, labels)
    tuner = SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4)), CLASSES, tokenizer,
                      SkipConfig(skip_layers=2, top_count=6), policy=backend)
    with torch.autocast("cpu", dtype=dtype):
        loss, grads = _step(tuner, images, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - want.item()) < 0.05 * abs(want.item())  # bf16/fp16 matmuls, fp32 accumulation
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["skip", "lskip", "cskip", "ft", "coop", "lora", "lskip-adapter"])
def test_weights_in_bf16_fp16_fp64_tune(mode, dtype, tokenizer):
    """The cache is in the model's dtype unless cache_dtype says otherwise; a step trains; fp64
    matches fp32 to fp32's precision."""
    images, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3])
    model = skipkernels.patch_clip(tiny_clip(layers=4).to(dtype))
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=2, top_count=6))
    assert tuner.dtype == dtype
    if tuner.plan.caches_prefix:
        assert tuner.cache_dtype == dtype and tuner.text_cache.tokens_at_block.dtype == dtype
        assert tuner.image_prefix(images.to(dtype)).dtype == dtype
    opt = torch.optim.SGD(tuner.parameter_groups(lr=1e-2), lr=1e-2)
    before = [p.detach().clone() for p in tuner.parameters() if p.requires_grad]
    loss, grads = _step(tuner, images.to(dtype), labels)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and torch.isfinite(loss)
    assert all(g is not None and g.dtype == p.dtype and torch.isfinite(g).all()
               for g, p in zip(grads, [p for p in tuner.parameters() if p.requires_grad]))
    opt.step()
    after = [p.detach() for p in tuner.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    fp32 = SkipTuner(skipkernels.patch_clip(tiny_clip(layers=4)), CLASSES, tokenizer,
                     SkipConfig(mode=mode, skip_layers=2, top_count=6))
    want, _ = _step(fp32, images, labels)
    tol = 1e-5 if dtype == torch.float64 else 0.05
    assert abs(loss.item() - want.item()) <= tol * abs(want.item())


def test_cache_dtype_overrides_the_model_dtype(tokenizer):
    model = skipkernels.patch_clip(tiny_clip(layers=4).to(torch.float64))
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(skip_layers=2, cache_dtype="float32"))
    assert tuner.cache_dtype == torch.float32 and tuner.text_cache.tokens_at_block.dtype == torch.float32
    loss, _ = _step(tuner, torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1]))
    assert loss.dtype == torch.float64 and math.isfinite(loss.item())


FAST = dict(epochs=1, batch_size=4, lr=1e-3, lr_image=1e-3, shots=2, same_class_batches=False, warmup_epochs=0,
            progress=False, eval_batch_size=64)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_finetune_amp_in_every_mode(mode, amp, synthetic_root, tmp_path):
    result = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode=mode, skip_layers=2),
                      train=TrainConfig(amp=amp, **FAST), out_dir=tmp_path / "run")
    assert result["finished"] and result["identity"]["autocast"] == {"bf16": "bfloat16", "fp16": "float16"}[amp]
    assert all(math.isfinite(h["loss"]) for h in result["history"])
    assert 0 <= result["accuracy"]["hm"] <= 100


def test_the_command_line_amp_flag_trains(synthetic_root, tmp_path, capsys):
    assert main(["finetune", "--data", str(synthetic_root), "--dataset", "synthetic", "--model", "skipkernels-tiny",
                 "--amp", "bf16", "--epochs", "1", "--shots", "2", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert '"accuracy"' in capsys.readouterr().out
