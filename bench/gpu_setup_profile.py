"""Set-up time of the first step and a kernel profile of a steady step, on a GPU.

    python bench/gpu_setup_profile.py OUT.json [--mode skip-triton-graph] [--profile N]

Builds the bench scenario (ViT-B/16 random weights, C = 500, batch 4, bf16), times from nothing
to the end of the first training step of one ``skipkernels bench`` mode (tuner set-up and text
prefix cache, image prefix of one batch, first step, CUDA-graph capture for graph modes: every
Triton compile and GEMM tile benchmark lands here), then the median of 20 steps, and with
``--profile N`` the kernels of N steps by total GPU time (torch.profiler). Writes JSON; run it
with an empty and then a warm TRITON_CACHE_DIR to get both set-up figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--mode", default="skip-triton-graph")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", type=int, default=0, help="profile this many steps (0: none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from skipkernels import bench
    from skipkernels.triton import gemm_tiles

    device = torch.device("cuda")
    scenario = bench.Scenario.default("cuda")
    model, tokenizer, autocast_dtype = bench.base_model(scenario, device)  # as skipkernels bench builds it
    images = bench._images(scenario, model, scenario.batch, device, seed=0)
    labels = bench._labels(scenario, scenario.batch, seed=0, same_class=True).to(device)

    torch.cuda.synchronize()
    start = time.perf_counter()
    runner = bench.ModeRunner(args.mode, model, tokenizer, scenario, device, autocast_dtype)
    inputs = runner.inputs_for(images)
    runner.step(inputs, labels)
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - start

    measure = bench._timer(device)
    steps = [measure(lambda: runner.step(inputs, labels)) for _ in range(args.steps)]
    result = {"mode": args.mode, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "scenario": vars(scenario), "setup_s": setup_s, "step_ms_median": statistics.median(steps) * 1e3,
              "step_ms_min": min(steps) * 1e3, "gemm_tile_benchmarks": gemm_tiles.table().benchmarks,
              "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile):
                runner.step(inputs, labels)
            torch.cuda.synchronize()
        rows = [(e.key, e.count, e.device_time_total) for e in prof.key_averages()
                if e.device_time_total > 0]
        rows.sort(key=lambda r: -r[2])
        total = sum(r[2] for r in rows)
        result["profile"] = {"steps": args.profile, "gpu_us_per_step": total / args.profile,
                             "top": [{"kernel": k[:160], "calls": c // args.profile, "us_per_step": t / args.profile}
                                     for k, c, t in rows[:30]]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}))
    if args.profile:
        for row in result["profile"]["top"][:15]:
            print(f"{row['us_per_step']:9.1f} us  {row['calls']:4d}x  {row['kernel'][:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
