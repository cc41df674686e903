"""Peak memory of a training step with the optimizer update after backward (optimizer.step())
and inside it (skipkernels.train.step.BackwardUpdate), and inside it with working copies of the
GEMM weights (skipkernels.train.working_copies; under autocast only): on CPU the allocator's
accounting (skipkernels.train.memory.CpuAllocatorPeak), on CUDA max_memory_allocated. Autocast:
bf16 on CUDA, none on CPU unless ``--amp bf16``.

    python bench/update_memory.py [--model ViT-B-16] [--mode skip] [--classes 100] [--batch 4] [--omega 6]
                                  [--device cpu|cuda] [--amp auto|bf16|none] [--out FILE.json]

Two windows per variant, each on a fresh tuner (random weights, seed 0):
- ``first_steps``: 1 + 3 steps from before the first one (gradients and momentum created), as
  ``skipkernels bench``'s CPU memory measurement; on CPU above the level before them, on CUDA
  the whole allocation (weights included);
- ``steady_step``: one step from a state with momentum buffers and no gradients held.
"""
from __future__ import annotations

import argparse
import gc
import json

import torch

from skipkernels import SkipConfig, SkipTuner
from skipkernels.models import create_model
from skipkernels.patch import patch_clip
from skipkernels.skip.modes import mode_plan
from skipkernels.train.memory import CpuAllocatorPeak, PeakMemory
from skipkernels.train.step import EagerStep


def _meter(device):
    return PeakMemory(device) if device.type == "cuda" else CpuAllocatorPeak()


def eager_step(model_name, mode, classes, batch, omega, device, autocast_dtype, in_backward, working_copies=False):
    """A fresh tuner (random weights, seed 0; ω applies to the LSkip modes), its SGD, the Trainer's
    eager step, and one batch: (tuner, optimizer, step, inputs, labels)."""
    model, tokenizer = create_model(model_name, pretrained="none", device=device, seed=0)
    model = patch_clip(model)
    names = [f"class {i}" for i in range(classes)]
    cached = mode_plan(mode, omega).caches_prefix
    tuner = SkipTuner(model, names, tokenizer, SkipConfig(mode=mode, skip_layers=omega if cached else None), seed=1)
    optimizer = torch.optim.SGD(tuner.parameter_groups(2e-5, 5e-6), lr=2e-5, momentum=0.9, weight_decay=5e-4)
    step = EagerStep(tuner, optimizer, autocast_dtype, update_in_backward=in_backward, working_copies=working_copies)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.arange(batch) % classes
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        inputs = tuner.image_prefix(images).to(tuner.cache_dtype) if tuner.plan.caches_prefix else images
    return tuner, optimizer, step, inputs, labels


def release(device) -> None:
    """A variant's model and optimizer gone before the next is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report(out: dict, path: str | None) -> None:
    """Print the JSON, and write it to ``path`` when given."""
    print(json.dumps(out, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def measure(model_name, mode, classes, batch, omega, in_backward, device, autocast_dtype, working_copies=False):
    tuner, optimizer, step, inputs, labels = eager_step(model_name, mode, classes, batch, omega, device, autocast_dtype,
                                                        in_backward, working_copies)
    with _meter(device) as first:
        for _ in range(4):
            step(inputs, labels)
    optimizer.zero_grad(set_to_none=True)
    with _meter(device) as steady:
        step(inputs, labels)
    trainable = [p for _, p in tuner.trainable_named_parameters()]
    mb = 2 ** 20
    copies_mb = step.working_copies.nbytes() / mb if working_copies else 0.0
    return {"working_copies_mb": copies_mb,  # on CPU, made in the first window: the steady peak leaves them out
            "first_steps_mb": first.peak_bytes / mb, "steady_step_mb": steady.peak_bytes / mb,
            "trainable_fp32_mb": sum(p.numel() * 4 for p in trainable) / mb,
            "largest_trainable_mb": max(p.numel() * 4 for p in trainable) / mb,
            "momentum_mb": sum(s["momentum_buffer"].numel() * 4 for s in optimizer.state.values()) / mb}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--mode", default="skip")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--omega", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"),
                        help="autocast: auto is bf16 on cuda, none on cpu")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = {"model": args.model, "mode": args.mode, "classes": args.classes, "batch": args.batch, "omega": args.omega,
           "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else
           "cpu allocator peak above the level before the window (torch.profiler)"}
    amp = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    autocast_dtype = torch.bfloat16 if amp == "bf16" else None
    out["amp"] = amp
    variants = [("after_backward", False, False), ("in_backward", True, False)]
    if autocast_dtype is not None:
        variants.append(("in_backward_working_copies", True, True))
    for name, in_backward, copies in variants:
        out[name] = measure(args.model, args.mode, args.classes, args.batch, args.omega, in_backward, device,
                            autocast_dtype, copies)
        release(device)
    report(out, args.out)


if __name__ == "__main__":
    main()
