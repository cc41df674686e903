"""Helpers shared by the tests that train two ways and compare the results bit for bit."""
import torch

from skipkernels.data.coop import load_splits
from skipkernels.data.fewshot import sample_few_shot
from skipkernels.train.trainer import TrainConfig, Trainer


def few_shot_items(synthetic_root):
    """The synthetic dataset's class names and 4 shots a class."""
    splits = load_splits(synthetic_root, "synthetic")
    return splits.classnames, sample_few_shot(splits.train, 4, seed=1)


def train(tuner, items, defaults: dict, out_dir=None, **config):
    """A Trainer on ``defaults`` overridden by ``config``, resumed where ``out_dir`` holds a
    checkpoint, trained."""
    trainer = Trainer(tuner, items, TrainConfig(**{**defaults, **config}), out_dir)
    trainer.resume()
    trainer.train()
    return trainer


def trained_state(trainer):
    """(weights, momentum buffers) of the trainable tensors, by name."""
    weights = {n: p.detach().clone() for n, p in trainer.tuner.trainable_named_parameters()}
    names = {p: n for n, p in trainer.tuner.trainable_named_parameters()}
    momentum = {names[p]: s["momentum_buffer"].clone() for p, s in trainer.optimizer.state.items()}
    return weights, momentum


def assert_identical(a, b):
    """Two ``trained_state``s, equal bit for bit (and not empty)."""
    for part_a, part_b in zip(a, b):
        assert part_a.keys() == part_b.keys() and part_a
        for name in part_a:
            assert torch.equal(part_a[name], part_b[name]), name
