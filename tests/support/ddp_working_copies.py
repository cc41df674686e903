"""Run by tests/train/test_working_copies.py under torchrun (2 ranks, gloo): the Trainer under bf16
autocast with and without working copies; rank 0 writes whether weights and momentum match bit
for bit, and the choice the Trainer printed.

    python -m torch.distributed.run --nproc_per_node=2 ddp_working_copies.py SYNTHETIC_ROOT OUT.json
"""
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # support/, tests/ (conftest)

from conftest import import_open_clip, tiny_clip  # noqa: E402
from train_runs import few_shot_items, train, trained_state  # noqa: E402

from skipkernels import SkipConfig, SkipTuner, distributed  # noqa: E402

FAST = dict(batch_size=2, lr=3e-2, lr_image=3e-2, shots=4, same_class_batches=False, warmup_epochs=1,
            warmup_lr=1e-2, progress=False, amp="bf16", epochs=2)


def main(synthetic_root: str, out: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    names, items = few_shot_items(synthetic_root)
    states, choices = {}, {}
    for copies in ("off", "on"):
        tuner = SkipTuner(tiny_clip(layers=2), names, import_open_clip().get_tokenizer("ViT-B-16"),
                          SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5), seed=1)
        trainer = train(tuner, items, FAST, working_copies=copies)
        states[copies], choices[copies] = trained_state(trainer), str(trainer.working_copies_choice)
    same = all(part_a.keys() == part_b.keys() and all(torch.equal(part_a[n], part_b[n]) for n in part_a)
               for part_a, part_b in zip(states["off"], states["on"]))
    if distributed.is_main():
        Path(out).write_text(json.dumps({"same": same, "choices": choices, "world": distributed.world_size()}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
