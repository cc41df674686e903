"""Weight casts per training step under autocast, without and with working copies of the GEMM
weights (skipkernels.train.working_copies), and the steady step's time.

    python bench/weight_casts.py [--model ViT-B-16] [--modes skip,lora,coop] [--classes 100] [--batch 4]
                                 [--omega 6] [--device cpu|cuda] [--repeats 5] [--out FILE.json]

For each mode and variant, a fresh tuner (random weights, seed 0) runs the Trainer's eager step
(bf16 autocast, update inside backward) twice, then one counted step: every conversion of an fp32
parameter to bf16 (autocast's casts and the copies' writes alike), split into the forward and
the backward with its update. Then ``--repeats`` timed steps of each variant, the two variants
alternating so that the machine's drift falls on both (the median; CUDA-synchronised).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from update_memory import eager_step, release, report  # bench/, the script's own folder

BF16 = torch.bfloat16


class ParameterCasts(TorchDispatchMode):
    """Counts fp32 -> bf16 conversions whose source is one of ``params`` (by storage)."""

    def __init__(self, params):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.count, self.nbytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = target = None
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0], kwargs.get("dtype")
        elif func is torch.ops.aten.copy_.default:
            source, target = args[1], args[0].dtype
        if target == BF16 and isinstance(source, torch.Tensor) and source.dtype == torch.float32 and \
                source.untyped_storage().data_ptr() in self.storages:
            self.count += 1
            self.nbytes += source.numel() * 4
        return func(*args, **kwargs)


def prepare(model_name, mode, classes, batch, omega, device, copies):
    """The variant's step, its inputs and labels, and its casts per steady step."""
    tuner, _, step, inputs, labels = eager_step(model_name, mode, classes, batch, omega, device, BF16, True, copies)
    for _ in range(2):
        step(inputs, labels)
    params = list(tuner.model.parameters())
    forward, rest = ParameterCasts(params), ParameterCasts(params)
    loss_fn = step.loss

    def counted_loss(x, y):  # the forward alone under the first counter
        with forward:
            return loss_fn(x, y)
    step.loss = counted_loss
    with rest:
        step(inputs, labels)
    step.loss = loss_fn
    mb = 2 ** 20
    counts = {"forward_casts": forward.count, "forward_cast_fp32_mb": forward.nbytes / mb,
              "backward_and_update_casts": rest.count - forward.count,
              "backward_and_update_cast_fp32_mb": (rest.nbytes - forward.nbytes) / mb,
              "copies_mb": step.working_copies.nbytes() / mb if copies else 0.0}
    return step, inputs, labels, counts


def timed_step_ms(step, inputs, labels, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(inputs, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--modes", default="skip,lora,coop")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--omega", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = {"model": args.model, "classes": args.classes, "batch": args.batch, "omega": args.omega,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": "bf16",
           "step": "eager, update in backward", "modes": {}}
    for mode in args.modes.split(","):
        variants = {name: prepare(args.model, mode, args.classes, args.batch, args.omega, device, copies)
                    for name, copies in (("autocast_casts", False), ("working_copies", True))}
        times = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, (step, inputs, labels, _) in variants.items():
                times[name].append(timed_step_ms(step, inputs, labels, device))
        out["modes"][mode] = {name: {**counts, "step_ms_median": statistics.median(times[name]),
                                     "step_ms": times[name]} for name, (_, _, _, counts) in variants.items()}
        del variants
        release(device)
    report(out, args.out)


if __name__ == "__main__":
    main()
