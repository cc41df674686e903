"""Skip Tuning in a few lines with the public API, on the embedded synthetic dataset.

    python python/quickstart.py [--model ViT-B-16 --pretrained /path/to/weights.pt]
"""
import argparse

import torch

import skipkernels
from skipkernels.data.coop import load_splits
from skipkernels.data.fewshot import base_new_labels, sample_few_shot, subset_classes
from skipkernels.data.images import ItemDataset, TrainTransform, make_loader, preprocess_config
from skipkernels.data.synthetic import ensure_synthetic
from skipkernels.models import create_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="skipkernels-tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--skip-layers", type=int, default=None, help="omega (default: half the blocks)")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    splits = load_splits(ensure_synthetic(), "synthetic")
    base, _ = base_new_labels(len(splits.classnames))
    items = sample_few_shot(subset_classes(splits.train, base), shots=16, seed=1)
    classnames = [splits.classnames[i] for i in base]

    model, tokenizer = create_model(args.model, args.pretrained)
    model = skipkernels.patch_clip(model)
    config = skipkernels.SkipConfig(skip_layers=args.skip_layers, top_ratio=0.5)
    tuner = skipkernels.SkipTuner(model, classnames, tokenizer, config)
    optimizer = torch.optim.SGD(tuner.parameter_groups(lr=3e-3, lr_image=3e-3), lr=3e-3, momentum=0.9)

    size, mean, std = preprocess_config(model)
    dataset = ItemDataset(items, TrainTransform(size, mean, std), seed=1)
    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)
        model.eval()  # LSkip: cache the frozen prefix of this epoch's augmented images
        batches = [(tuner.image_prefix(images), labels) for images, labels, _ in make_loader(dataset, 8)]
        model.train()
        total = 0.0
        for tokens, labels in batches:
            loss = tuner.loss(tokens, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"epoch {epoch + 1}: loss {total / len(batches):.4f}, last subset {tuner.last_selected.tolist()}")


if __name__ == "__main__":
    main()
