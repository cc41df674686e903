"""torchrun with 2 CPU processes (gloo): batch 2 per rank equals one process with batch 4."""
import json
import subprocess
import sys

import pytest
import torch

from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["skip", "ft"])
def test_two_ranks_equal_one_process_with_the_global_batch(mode, synthetic_root, tmp_path):
    common = dict(epochs=2, lr=3e-3, lr_image=3e-3, shots=4, warmup_epochs=0, seed=3, progress=False)
    single = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode=mode, skip_layers=1,
                                                                                       top_ratio=0.5),
                      train=TrainConfig(batch_size=4, same_class_batches=False, **common), out_dir=tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "skipkernels", "finetune", "--data", str(synthetic_root), "--dataset", "synthetic",
           "--model", "skipkernels-tiny", "--mode", mode, "--skip-layers", "1", "--top-ratio", "0.5",
           "--batch-size", "2", "--mixed-batches", "--epochs", "2", "--lr", "3e-3", "--lr-image", "3e-3",
           "--shots", "4", "--warmup-epochs", "0", "--seed", "3", "--no-progress", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["finished"]
    for a, b in zip(single["history"], two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    w1 = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for key in w1:
        scale = w1[key].abs().max().item() + 1e-12
        assert (w1[key] - w2[key]).abs().max().item() <= 1e-4 * scale, key
    # evaluation is sharded over ranks and gathered: same accuracy as one process
    assert two["accuracy"]["base"] == pytest.approx(single["accuracy"]["base"], abs=100 / 96 + 1e-9)
