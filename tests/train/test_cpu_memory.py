"""CPU peak training memory from the allocator's events (torch.profiler), not from RSS."""
import torch

from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.memory import CpuAllocatorPeak
from skipkernels.train.trainer import MEMORY_PROBE_STEPS, TrainConfig
from skipkernels.train.job import finetune

MB = 1_000_000


def test_peak_is_the_most_held_at_once_above_the_start(capfd):
    before = torch.ones(MB // 4)  # 1 MB held before the window: its free inside is not counted
    with CpuAllocatorPeak() as probe:
        a = torch.ones(MB)  # 4 MB
        b = torch.ones(2 * MB)  # 8 MB: 12 MB held
        del a, before  # 8 MB
        c = torch.ones(MB // 2) * 2  # two 2 MB tensors: 12 MB again, never more
        del b, c
    assert 12 * MB <= probe.peak_bytes < 12 * MB + 64 * 1024
    assert probe.overhead_s > 0
    err = capfd.readouterr().err
    assert "profiler_start" not in err and "Memory block of unknown size" not in err
    print("stderr works again", file=__import__("sys").stderr)
    assert "stderr works again" in capfd.readouterr().err


def test_window_closes_after_the_given_steps():
    probe = CpuAllocatorPeak(steps=2)
    with probe:
        kept = [torch.ones(MB)]
        probe.step_done()
        kept.append(torch.ones(MB))
        probe.step_done()  # the window closes here: 8 MB
        kept.append(torch.ones(4 * MB))  # not seen
    assert 8 * MB <= probe.peak_bytes < 8 * MB + 64 * 1024


def test_finetune_reports_the_cpu_allocator_peak(synthetic_root, tmp_path):
    train = TrainConfig(epochs=1, batch_size=8, lr=3e-3, lr_image=3e-3, shots=8, same_class_batches=False,
                        warmup_epochs=0, progress=False)
    ft = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="ft"), train=train,
                  out_dir=tmp_path / "ft")
    skip = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=2),
                    train=train, out_dir=tmp_path / "skip")
    for results in (ft, skip):
        assert results["peak_memory_kind"].startswith(f"cpu allocator peak in the first {MEMORY_PROBE_STEPS} steps")
    # FT holds gradients and momentum for every weight (3.6 M parameters: 2 x 14 MB), Skip Tuning for
    # a fraction, with activations of the suffix blocks only
    assert ft["peak_train_memory_mb"] > 2 * 3.5e6 * 4 / 2**20
    assert 0 < skip["peak_train_memory_mb"] < ft["peak_train_memory_mb"] / 4
