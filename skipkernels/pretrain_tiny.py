"""Pretrain ``skipkernels-tiny-shapes``: CLIP's contrastive objective on the compositional shapes set.

    python -m skipkernels.pretrain_tiny [--out skipkernels/weights/skipkernels-tiny-shapes.safetensors]

Every step draws fresh images of each pretraining class (``shapes.PRETRAIN_CLASSES``, never the
demo's new classes) and pairs them with the captions "a photo of a <colour> <shape>.". Seeds are
fixed and it runs on one thread, so a rerun writes the same weights (three full runs wrote the
same bytes): 600 steps of 72 images, about 100 s on one CPU core.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skipkernels.data import shapes
from skipkernels.data.images import EvalTransform, preprocess_config
from skipkernels.models import SHIPPED_WEIGHTS, create_model

MODEL = "skipkernels-tiny-shapes"
WEIGHTS = SHIPPED_WEIGHTS[MODEL]
TEMPLATE = "a photo of a {}."  # the trainer's default template, so zero-shot prompts match the captions
PRETRAIN = {"steps": 600, "images_per_class": 4, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 100, "seed": 0}


def draw_batch(classes, per_class: int, transform, rng: random.Random,
               draw=shapes.draw_pretraining_image) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` fresh images of each of ``classes``, and each image's class index."""
    images, labels = [], []
    for label, (colour, shape) in enumerate(classes):
        for _ in range(per_class):
            images.append(transform(draw(colour, shape, rng)))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def contrastive_loss(image_features, text_features, logit_scale, labels) -> torch.Tensor:
    """CLIP's symmetric InfoNCE. A batch holds several images per caption, so each caption's
    positives are all its images (uniform target over them) rather than one diagonal entry."""
    logits = logit_scale.exp() * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    image_to_text = F.cross_entropy(logits, labels)
    positives = F.one_hot(labels, logits.shape[1]).T.float()
    text_to_image = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def pretrain(out: Path = WEIGHTS, classes=shapes.PRETRAIN_CLASSES, steps: int = PRETRAIN["steps"],
             log_every: int = 100) -> dict:
    torch.set_num_threads(1)
    seed = PRETRAIN["seed"]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tokenizer = create_model(MODEL, "none", seed=seed)  # pretraining starts from random weights
    model.train()
    transform = EvalTransform(*preprocess_config(model))  # the drawing's randomness is the augmentation
    captions = tokenizer([TEMPLATE.format(shapes.classname(c, s)) for c, s in classes])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=PRETRAIN["lr"],
                                  weight_decay=PRETRAIN["weight_decay"])
    warmup = PRETRAIN["warmup_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, step / steps))))
    start = time.perf_counter()
    for step in range(steps):
        images, labels = draw_batch(classes, PRETRAIN["images_per_class"], transform, rng)
        loss = contrastive_loss(model.encode_image(images), model.encode_text(captions), model.logit_scale, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:7.1f} s", flush=True)
    seconds = time.perf_counter() - start
    save_weights(model, out, {"steps": str(steps)})  # no timing in the file, so reruns can match it
    return {"seconds": seconds, "out": str(out)}


def save_weights(model, path: Path, metadata: dict) -> None:
    """fp16 safetensors: half the size, and the model is trained in fp32 again after loading."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"model": MODEL, **metadata})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--steps", type=int, default=PRETRAIN["steps"])
    args = parser.parse_args(argv)
    result = pretrain(args.out, steps=args.steps)
    print(f"saved: {result['out']} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
