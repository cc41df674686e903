"""Python overhead of one steady-state Skip Tuning step: how many calls run inside skipkernels,
and how often the step re-derives what could be decided once (the towers, a block's parts, its
hooks, the kernel policy). cProfile's call counts are deterministic, so they can be compared
between commits; the wall time of the eager step is measured too.

    python bench/step_overhead.py [--model ViT-B-16] [--classes 100] [--batch 4] [--omega 6]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from pathlib import Path

import torch

import skipkernels
from skipkernels import SkipTuner
from skipkernels.models import create_model

# What a steady step must not re-derive: the towers, a block's parts, its hooks, the kernel policy,
# an op's binding, a measured-table lookup.
WATCHED = {"model_towers": "families.py", "block_parts": "ops/block.py", "block_hooks": "pet/hooks.py",
           "resolve": "ops/policy.py", "bind": "ops/op.py", "prefers_triton": "ops/measured.py"}


def build(model_name, classes, batch, omega, mode="skip"):
    model, tokenizer = create_model(model_name, pretrained="none", seed=0)
    model = skipkernels.patch_clip(model)
    names = [f"class {i}" for i in range(classes)]
    tuner = SkipTuner(model, names, tokenizer, mode=mode, skip_layers=omega)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % classes
    return tuner, tuner.image_prefix(images), labels


def one_step(tuner, tokens, labels):
    tuner.zero_grad(set_to_none=True)
    tuner.loss(tokens, labels).backward()


def counts(tuner, tokens, labels) -> dict:
    profile = cProfile.Profile()
    profile.enable()
    one_step(tuner, tokens, labels)
    profile.disable()
    stats = pstats.Stats(profile).stats
    inside = sum(calls for (file, _, _), (_, calls, *_rest) in stats.items() if "/skipkernels/" in file)
    watched = {name: sum(calls for (file, _, fn), (_, calls, *_rest) in stats.items()
                         if fn == name and file.endswith(where)) for name, where in WATCHED.items()
               if (Path(skipkernels.__file__).parent / where).is_file()}
    return {"python_calls_in_skipkernels": inside, **watched}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--omega", type=int, default=6)
    p.add_argument("--mode", default="skip")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    tuner, tokens, labels = build(args.model, args.classes, args.batch, args.omega, args.mode)
    for _ in range(2):  # steady state: caches, lazy loads and first-call work done
        one_step(tuner, tokens, labels)
    result = counts(tuner, tokens, labels)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        one_step(tuner, tokens, labels)
        times.append(time.perf_counter() - start)
    result.update(model=args.model, mode=args.mode, classes=args.classes, batch=args.batch, omega=args.omega,
                  step_ms_min=round(1e3 * min(times), 2), torch=torch.__version__)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
