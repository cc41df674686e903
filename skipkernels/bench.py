"""``skipkernels bench``: one training step and one epoch per mode, measured side by side. What is
measured lives here; the table, chart and JSON of a run are ``skipkernels.bench_report``'s.

Modes (same model weights, same data, one process, interleaved repetitions):
  paper             the paper's Skip Tuning as its code computes it: plain open_clip in eager
                    PyTorch, full prompts, cached prefixes, CSkip (skip/paper.py); every ratio's base
  ft, coop          the paper's baselines on the reference path
  skip-ref          Skip Tuning on the reference path (eager PyTorch ops)
  skip-compile      skip-ref's loss under torch.compile
  skip-compile-graphs the static step's loss under torch.compile(mode="reduce-overhead"): what a
                    user would try first for CUDA graphs (CUDA only)
  skip-kernels      Skip Tuning with our compiled / Triton ops (backend "auto")
  skip-triton       skip-kernels with every Triton kernel forced on (GPU only)
  skip-graph        skip-kernels with the whole step captured in a CUDA graph (CUDA only)
  skip-triton-graph skip-triton captured in a CUDA graph: fewest launches, none from Python

Times: CUDA events on a GPU, perf_counter on a CPU. Peak training memory is measured per mode in
a subprocess of its own (CUDA max_memory_allocated, or the CPU allocator's peak from
torch.profiler), so modes don't share a baseline; the LSkip feature cache is reported separately.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from skipkernels.ops.policy import ALL_TRITON, KernelPolicy



@dataclasses.dataclass(frozen=True)
class BenchMode:
    """How a bench mode runs a step: the SkipTuner mode it trains, the kernels (``kernels``: None is
    the PyTorch references, "auto" the measured table, ALL_TRITON every Triton kernel), how the
    loss is compiled (None, "compile": torch.compile, "graphs": the static loss under
    mode="reduce-overhead"), whether the whole step is captured in a CUDA graph (skip/graph.py),
    and whether it is the paper's own computation (skip/paper.py)."""
    name: str
    tuner_mode: str = "skip"
    kernels: str | None = None
    compile: str | None = None
    captured: bool = False
    paper: bool = False

    @property
    def policy(self) -> KernelPolicy:
        if self.kernels is None:
            return KernelPolicy("torch")
        return KernelPolicy("auto", table=None if self.kernels == "auto" else self.kernels)

    def unavailable(self, device) -> str | None:
        """Why this mode cannot run on ``device`` here, or None."""
        if (self.captured or self.compile == "graphs") and device.type != "cuda":
            return "CUDA graphs need a GPU"
        if self.kernels == ALL_TRITON and device.type != "cuda":
            return "Triton kernels need a GPU"
        if self.kernels == ALL_TRITON and importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if self.captured:
            from skipkernels import _ext
            if not _ext.CUDA_BUILT:
                return f"compiled CUDA ops missing: {_ext.load_error}"
        return None


# The table of the named modes; any SkipTuner mode (ft, coop, a PET mode) is a mode too.
BENCH_MODES = {m.name: m for m in (
    BenchMode("paper", paper=True),
    BenchMode("ft", "ft"),
    BenchMode("coop", "coop"),
    BenchMode("skip-ref"),
    BenchMode("skip-compile", compile="compile"),
    BenchMode("skip-compile-graphs", compile="graphs"),
    BenchMode("skip-kernels", kernels="auto"),
    BenchMode("skip-triton", kernels=ALL_TRITON),
    BenchMode("skip-graph", kernels="auto", captured=True),
    BenchMode("skip-triton-graph", kernels=ALL_TRITON, captured=True),
)}
ALL_MODES = tuple(BENCH_MODES)
GRAPH_MODES = tuple(m.name for m in BENCH_MODES.values() if m.captured)
# Parameter-efficient methods can be added by their SkipTuner mode name, e.g. --modes ...,lskip-lora
DEFAULT_MODES = ALL_MODES + ("vlpet-large", "lskip-vlpet-large", "lora", "lskip-lora")

WORDS = ("alpine", "brindled", "crested", "dappled", "eastern", "feathered", "giant", "hooded", "indian",
         "jungle", "king", "lesser", "marbled", "northern", "olive", "painted", "royal", "spotted", "tufted")


@dataclasses.dataclass
class Scenario:
    model: str
    classes: int
    shots: int
    batch: int
    skip_layers: int | None  # None: the model's default ω (half its blocks), the number once the model is built
    epoch_images: int
    tokenizer: str | None = None  # None: the model's own (see models.load_tokenizer)

    @classmethod
    def default(cls, device: str, quick: bool = False, batch: int | None = None):
        if quick:
            return cls("skipkernels-tiny", 12, 4, batch or 4, None, 24)
        if device == "cuda":
            # An epoch of the ImageNet-like scenario is 8000 images (--epoch-images 8000); the
            # default times 800 so that every mode's epoch fits one run.
            return cls("ViT-B-16", 500, 16, batch or 4, None, 800)
        return cls("skipkernels-tiny", 100, 16, batch or 4, None, 400)


def class_names(count: int) -> list[str]:
    """Varied, deterministic names so prompt lengths (and text truncation) are realistic."""
    names = []
    for i in range(count):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(1 + i % 4)]
        names.append(" ".join(words) + f" {i}")
    return names


def bench_mode(name: str) -> BenchMode:
    """The table's mode ``name``, or a SkipTuner mode (ft, coop, a PET mode...) on the references."""
    from skipkernels.skip.modes import MODES
    if name in BENCH_MODES:
        return BENCH_MODES[name]
    if name in MODES:
        return BenchMode(name, name)
    raise ValueError(f"unknown bench mode {name!r}; choose from {ALL_MODES} or a tuner mode {MODES}")


def tuner_mode(name: str) -> str:
    """The SkipTuner mode a bench mode trains (paper and the skip-* modes: "skip")."""
    return bench_mode(name).tuner_mode


def _timer(device):
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
    else:
        def measure(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return measure


def _summary(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def mode_policy(name: str) -> KernelPolicy:
    """The kernels a bench mode runs (``BenchMode.policy``)."""
    return bench_mode(name).policy


class ModeRunner:
    """One mode's tuner, optimizer and a step function over synthetic data. ``plan``: what the
    tuner caches, runs and trains (``SkipTuner.plan``; paper's is Skip Tuning's)."""

    def __init__(self, name, base_model, tokenizer, scenario: Scenario, device, autocast_dtype):
        from skipkernels.skip.modes import mode_plan
        from skipkernels.skip.tuner import SkipTuner
        self.name = name
        self.mode = bench_mode(name)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.policy = self.mode.policy
        mode = self.mode.tuner_mode
        model = copy.deepcopy(base_model)
        if self.mode.paper:
            from skipkernels.patch import unpatch_clip
            from skipkernels.skip.paper import PaperSkipTuning
            self.tuner = PaperSkipTuning(unpatch_clip(model), class_names(scenario.classes), tokenizer,
                                         skip_layers=scenario.skip_layers)
            self.plan = mode_plan(mode, self.tuner.skip_layers)
        else:
            self.tuner = SkipTuner(model, class_names(scenario.classes), tokenizer, mode=mode,
                                   skip_layers=scenario.skip_layers, policy=self.policy)
            self.plan = self.tuner.plan
        self.optimizer = torch.optim.SGD(self.tuner.parameter_groups(2e-5, 5e-6), lr=2e-5, momentum=0.9,
                                         weight_decay=5e-4)
        self.loss_fn = self.tuner.loss
        if self.mode.compile == "compile":
            import logging
            # The reference step has data-dependent shapes (class subset, truncation): graph breaks
            # are expected there and logged at WARNING level for every break; keep the table readable.
            logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
            self.loss_fn = torch.compile(self.tuner.loss)
        if self.mode.compile == "graphs":
            # The static step (fixed subset size, no host sync) traces as one graph that inductor
            # replays with CUDA graphs; the optimizer step stays eager, as in most user code.
            tuner = self.tuner
            self.loss_fn = torch.compile(lambda x, y: tuner.loss(x, y, static=True), mode="reduce-overhead",
                                         fullgraph=True)
        self.graph_step = None
        self.scenario = scenario

    def inputs_for(self, images):
        if self.plan.caches_prefix:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                return self.tuner.image_prefix(images).to(self.tuner.cache_dtype)
        return images

    def step(self, inputs, labels):
        if self.mode.captured:
            if self.graph_step is None:
                from skipkernels.skip.graph import CapturedStep
                self.graph_step = CapturedStep(self.tuner, self.optimizer, inputs, labels, self.autocast_dtype)
            return self.graph_step(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.loss_fn(inputs, labels)
        loss.backward()
        self.optimizer.step()
        return loss


def _images(scenario, model, count, device, seed):
    from skipkernels.checks import image_size
    height, width = image_size(model)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(count, 3, height, width, generator=g).to(device)


def _labels(scenario, count, seed, same_class):
    g = torch.Generator().manual_seed(seed)
    if same_class:  # the protocol for shots >= 4: one class per batch
        return torch.full((count,), int(torch.randint(0, scenario.classes, (1,), generator=g)))
    return torch.randint(0, scenario.classes, (count,), generator=g)


def _available_modes(modes, device):
    out, skipped = [], {}
    for mode in modes:
        why = bench_mode(mode).unavailable(device)
        if why is None:
            out.append(mode)
        else:
            skipped[mode] = why
    return out, skipped


def base_model(scenario: Scenario, device, seed: int = 0):
    """The scenario's model (seeded random weights, patched) and tokenizer, and the autocast dtype
    every mode runs under: what each measurement starts from."""
    from skipkernels.models import create_model
    from skipkernels.patch import patch_clip
    model, tokenizer = create_model(scenario.model, None, device=device, seed=seed, tokenizer=scenario.tokenizer)
    return patch_clip(model), tokenizer, torch.bfloat16 if device.type == "cuda" else None


def measure_time(scenario: Scenario, modes, device, repeats: int, warmup: int, epoch: bool, seed: int = 0):
    base, tokenizer, autocast_dtype = base_model(scenario, device, seed)
    if scenario.skip_layers is None:  # resolved once, where the model is known: the report and memory runs get it
        from skipkernels.skip.towers import ModelPlan
        scenario.skip_layers = ModelPlan(base).default_skip_layers()[0]
    from skipkernels.skip.paper import UnsupportedPaperModel
    runners, refused = [], {}
    for mode in modes:
        try:
            runners.append(ModeRunner(mode, base, tokenizer, scenario, device, autocast_dtype))
        except UnsupportedPaperModel as err:
            refused[mode] = {"skipped": str(err)}
    del base
    measure = _timer(device)
    same_class = scenario.shots >= 4
    images = _images(scenario, runners[0].tuner.model, scenario.batch, device, seed)
    labels = _labels(scenario, scenario.batch, seed, same_class).to(device)
    inputs = {r.name: r.inputs_for(images) for r in runners}
    step_times = {r.name: [] for r in runners}
    for _ in range(warmup):
        for r in runners:
            r.step(inputs[r.name], labels)
    for _ in range(repeats):  # interleaved: each repetition runs every mode once
        for r in runners:
            step_times[r.name].append(measure(lambda r=r: r.step(inputs[r.name], labels)))
    result = {r.name: {"step_s": _summary(step_times[r.name]), "kernel_policy": dataclasses.asdict(r.policy)}
              for r in runners}
    if epoch:
        for r in runners:
            result[r.name].update(_measure_epoch(r, scenario, device, measure, seed))
    return {**result, **refused}


def _measure_epoch(runner, scenario, device, measure, seed):
    """One epoch over ``epoch_images`` images: LSkip caching (if any) then every step."""
    n = scenario.epoch_images
    batch = scenario.batch
    chunk = 64
    tuner = runner.tuner
    cache_s = 0.0
    cached = None
    if runner.plan.caches_prefix:
        def cache():
            nonlocal cached
            parts = []
            for start in range(0, n, chunk):
                imgs = _images(scenario, tuner.model, min(chunk, n - start), device, seed + start)
                parts.append(runner.inputs_for(imgs))
            cached = torch.cat(parts)
        cache_s = measure(cache)
    labels_all = _labels(scenario, n, seed, False).to(device)

    def steps():
        for start in range(0, n - batch + 1, batch):
            labels = labels_all[start:start + batch]
            if scenario.shots >= 4:
                labels = labels[:1].expand(batch).contiguous()
            x = cached[start:start + batch] if cached is not None else \
                _images(scenario, tuner.model, batch, device, seed + start)
            runner.step(x, labels)

    steps_s = measure(steps)
    cache_mb = 0.0 if cached is None else cached.numel() * cached.element_size() / 2**20
    return {"epoch_s": cache_s + steps_s, "epoch_cache_s": cache_s, "epoch_steps_s": steps_s,
            "epoch_images": n, "cache_mb": cache_mb}


def measure_memory_child(scenario: Scenario, mode: str, device, steps: int = 3) -> dict:
    """Run in a fresh process: peak memory of ``steps`` training steps of one mode."""
    from skipkernels.train.memory import CpuAllocatorPeak, PeakMemory
    model, tokenizer, autocast_dtype = base_model(scenario, device)
    runner = ModeRunner(mode, model, tokenizer, scenario, device, autocast_dtype)
    del model
    images = _images(scenario, runner.tuner.model, scenario.batch, device, 0)
    labels = _labels(scenario, scenario.batch, 0, scenario.shots >= 4).to(device)
    inputs = runner.inputs_for(images)
    if device.type == "cpu":
        # The allocator's own accounting (torch.profiler's allocation events) from before the
        # first step, which creates gradients and optimizer state: an RSS delta would not be a
        # peak, since the allocator reuses freed memory.
        with CpuAllocatorPeak() as probe:
            for _ in range(1 + steps):
                runner.step(inputs, labels)
        peak_mb = None if probe.peak_bytes is None else probe.peak_bytes / 2**20
        return {"peak_mb": peak_mb, "kind": f"cpu allocator peak over the first {1 + steps} steps, above the "
                                            "level before them (torch.profiler)"}
    runner.step(inputs, labels)  # first step creates gradients and optimizer state; measured below
    with PeakMemory(device) as peak:
        for _ in range(steps):
            runner.step(inputs, labels)
    # everything allocated: weights, gradients, optimizer state, activations, the batch
    return {"peak_mb": peak.peak_bytes / 2**20, "kind": "cuda max_memory_allocated during training steps",
            "breakdown_mb": memory_breakdown(runner, peak.start_bytes, peak.peak_bytes)}


def _tensor_bytes(tensors, device_type: str) -> int:
    """Bytes of distinct storages on ``device_type`` (views and shared tensors counted once)."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type == device_type:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def memory_breakdown(runner, before_bytes: int, peak_bytes: int, device_type: str = "cuda") -> dict:
    """Where a mode's peak goes (MB): what the model and optimizer hold between steps, what else
    was allocated then (caches, the batch, prototypes), and what a step adds on top (activations
    and workspace)."""
    model = runner.tuner.model
    params = list(model.parameters())
    weights = _tensor_bytes(params + list(model.buffers()), device_type)
    grads = _tensor_bytes((p.grad for p in params), device_type)
    state = _tensor_bytes((v for s in runner.optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
                          device_type)
    mb = 2**20
    return {"weights": weights / mb, "gradients": grads / mb, "optimizer_state": state / mb,
            "caches_and_inputs": max(0, before_bytes - weights - grads - state) / mb,
            "activations_and_workspace": max(0, peak_bytes - before_bytes) / mb}


def measure_memory(scenario: Scenario, modes, device) -> dict:
    out = {}
    for mode in modes:
        cmd = [sys.executable, "-m", "skipkernels.bench", "--memory-child", mode, "--device", device.type,
               "--scenario", json.dumps(dataclasses.asdict(scenario))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            out[mode] = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            continue
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scenario = Scenario.default(device.type, args.quick, args.batch)
    if args.model:
        scenario.model = args.model
    if args.classes:
        scenario.classes = args.classes
    if args.skip_layers is not None:
        scenario.skip_layers = args.skip_layers
    if args.tokenizer:
        scenario.tokenizer = args.tokenizer
    if args.epoch_images:
        scenario.epoch_images = args.epoch_images
    requested = [m for m in args.modes.split(",") if m]
    from skipkernels.skip.tuner import MODES
    unknown = sorted(set(requested) - set(ALL_MODES) - set(MODES))
    if unknown:
        raise ValueError(f"unknown bench modes {unknown}; choose from {ALL_MODES} or a tuner mode {MODES}")
    if args.no_compile:
        requested = [m for m in requested if m != "skip-compile"]
    modes, skipped = _available_modes(requested, device)
    print(f"bench on {device}: {scenario}", flush=True)
    results = measure_time(scenario, modes, device, args.repeats, args.warmup, not args.no_epoch)
    if not args.no_memory:
        for mode, mem in measure_memory(scenario, [m for m in modes if "step_s" in results[m]], device).items():
            results[mode]["memory"] = mem
    for mode, why in skipped.items():
        results[mode] = {"skipped": why}
    from skipkernels import bench_report
    return bench_report.write(results, scenario, device, args.repeats, args.warmup, Path(args.out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", default=",".join(DEFAULT_MODES))
    p.add_argument("--quick", action="store_true", help="tiny scenario (smoke test)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--skip-layers", type=int, default=None, help="omega (default: half the blocks of the model's "
                   "shallower tower, 6 for ViT-B/16)")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the model's own)")
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--epoch-images", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-epoch", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench/results")


def _child_main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--memory-child", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--scenario", required=True)
    args = p.parse_args(argv)
    scenario = Scenario(**json.loads(args.scenario))
    print(json.dumps(measure_memory_child(scenario, args.memory_child, torch.device(args.device))))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
