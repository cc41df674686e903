"""``skipkernels bench``: one training step and one epoch per mode, measured side by side. What is
measured lives here; the table, chart and JSON of a run are ``skipkernels.bench_report``'s.

Modes (same model weights, same data, one process, interleaved repetitions). The skip-* modes
are the Trainer's own step objects (skipkernels/train/step.py: eager, compiled, graph) under a
kernel policy, so each is a step ``finetune --step KIND`` runs; paper, ft, coop and
skip-compile-graphs are the bases they are compared with:
  paper             the paper's Skip Tuning as its code computes it: plain open_clip in eager
                    PyTorch, full prompts, cached prefixes, CSkip (skip/paper.py); every ratio's base
  ft, coop          the paper's baselines on the reference path (eager step)
  skip-compile-graphs base: the static step's loss under torch.compile(mode="reduce-overhead"), the
                    optimizer eager: what a user would try first for CUDA graphs (CUDA only)
  skip-ref          the eager step, PyTorch ops (step eager, backend torch)
  skip-compile      the compiled step (step compiled, backend auto: its loss and CSkip ops compiled)
  skip-kernels      the eager step with our compiled / Triton ops (step eager, backend auto)
  skip-triton       skip-kernels with every Triton kernel forced on (GPU only)
  skip-graph        the CUDA-graph step with our ops (step graph, backend auto; CUDA only)
  skip-triton-graph skip-triton's ops in the CUDA-graph step: fewest launches, none from Python

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

from skipkernels.data.names import class_names
from skipkernels.ops.policy import ALL_TRITON, KernelPolicy



@dataclasses.dataclass(frozen=True)
class BenchMode:
    """How a bench mode runs a step: the SkipTuner mode it trains, the kernels (``kernels``: None is
    the PyTorch references, "auto" the measured table, ALL_TRITON every Triton kernel), the
    Trainer's step kind (``step``: eager, compiled or graph; train/step.py), and for the bases,
    whether it is the paper's own computation (skip/paper.py) or the static loss under
    torch.compile(mode="reduce-overhead") (``compile_graphs``)."""
    name: str
    tuner_mode: str = "skip"
    kernels: str | None = None
    step: str = "eager"
    paper: bool = False
    compile_graphs: bool = False

    @property
    def captured(self) -> bool:
        return self.step == "graph"

    @property
    def policy(self) -> KernelPolicy:
        if self.kernels is None:
            return KernelPolicy("torch")
        return KernelPolicy("auto", table=None if self.kernels == "auto" else self.kernels)

    def unavailable(self, device) -> str | None:
        """Why this mode cannot run on ``device`` here, or None."""
        if (self.captured or self.compile_graphs) and device.type != "cuda":
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
    BenchMode("skip-compile", kernels="auto", step="compiled"),
    BenchMode("skip-compile-graphs", kernels="auto", compile_graphs=True),
    BenchMode("skip-kernels", kernels="auto"),
    BenchMode("skip-triton", kernels=ALL_TRITON),
    BenchMode("skip-graph", kernels="auto", step="graph"),
    BenchMode("skip-triton-graph", kernels=ALL_TRITON, step="graph"),
)}
ALL_MODES = tuple(BENCH_MODES)
GRAPH_MODES = tuple(m.name for m in BENCH_MODES.values() if m.captured)
# Parameter-efficient methods can be added by their SkipTuner mode name, e.g. --modes ...,lskip-lora
DEFAULT_MODES = ALL_MODES + ("vlpet-large", "lskip-vlpet-large", "lora", "lskip-lora")

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
        from skipkernels.skip.tuner import SkipConfig, SkipTuner
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
            self.tuner = SkipTuner(model, class_names(scenario.classes), tokenizer,
                                   SkipConfig(mode=mode, skip_layers=scenario.skip_layers), policy=self.policy)
            self.plan = self.tuner.plan
        self.optimizer = torch.optim.SGD(self.tuner.parameter_groups(2e-5, 5e-6), lr=2e-5, momentum=0.9,
                                         weight_decay=5e-4)
        self.scenario = scenario
        from skipkernels.train.step import EagerStep, StepChoice, choose_step, make_step
        if self.mode.paper:
            self.train_step = EagerStep(self.tuner, self.optimizer, autocast_dtype)
        elif self.mode.compile_graphs:
            # The base: the static step traces as one graph that inductor replays with CUDA graphs;
            # the optimizer step stays eager, as in most user code.
            tuner = self.tuner
            compiled = torch.compile(lambda x, y: tuner.loss(x, y, static=True), mode="reduce-overhead",
                                     fullgraph=True)

            def loss(x, y):
                tuner.towers.follow_ambient()  # ops bound again here, never inside the trace
                return compiled(x, y)
            self.train_step = EagerStep(tuner, self.optimizer, autocast_dtype, loss)
        else:  # the Trainer's step of this kind; one that cannot run raises StepUnavailable
            choice = choose_step(self.mode.step, self.tuner, self.optimizer, scenario.batch)
            # the Trainer's defaults: the update in backward, working copies under autocast
            from skipkernels.train.step import choose_update, choose_working_copies
            self.update_choice = choose_update("auto", choice.kind, self.optimizer)
            self.working_copies_choice = choose_working_copies("auto", choice.kind, autocast_dtype)
            self.train_step = make_step(StepChoice(choice.kind, f"bench mode {name}"), self.tuner, self.optimizer,
                                        autocast_dtype, update=self.update_choice, working=self.working_copies_choice)

    def step_settings(self) -> dict:
        """How this mode's step runs: its kind, where the update runs and whether it keeps working
        copies (the Trainer's choices, each with its reason), for the report."""
        out = {"kind": getattr(self.train_step, "kind", "eager")}
        for name in ("update_choice", "working_copies_choice"):
            choice = getattr(self, name, None)
            out[name.removesuffix("_choice")] = str(choice) if choice is not None else "not the Trainer's step"
        return out

    def inputs_for(self, images):
        if self.plan.caches_prefix:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                return self.tuner.image_prefix(images).to(self.tuner.cache_dtype)
        return images

    def step(self, inputs, labels):
        return self.train_step(inputs, labels)


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
    from skipkernels.train.step import StepUnavailable
    runners, refused = [], {}
    for mode in modes:
        try:
            runners.append(ModeRunner(mode, base, tokenizer, scenario, device, autocast_dtype))
        except (UnsupportedPaperModel, StepUnavailable) as err:
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
    result = {r.name: {"step_s": _summary(step_times[r.name]), "kernel_policy": dataclasses.asdict(r.policy),
                       "step": r.step_settings()} for r in runners}
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
    """Run in a fresh process: peak memory of ``steps`` training steps of one mode, and the plan's
    prediction beside it (``predicted_for_bench``, called after the measurement: it runs steps of
    its own)."""
    from skipkernels.memory_plan import predicted_for_bench
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
                                            "level before them (torch.profiler)",
                **predicted_for_bench(scenario, runner, device)}
    runner.step(inputs, labels)  # first step creates gradients and optimizer state; measured below
    with PeakMemory(device) as peak:
        for _ in range(steps):
            runner.step(inputs, labels)
    # everything allocated: weights, gradients, optimizer state, activations, the batch
    return {"peak_mb": peak.peak_bytes / 2**20, "kind": "cuda max_memory_allocated during training steps",
            "breakdown_mb": memory_breakdown(runner, peak.start_bytes, peak.peak_bytes),
            **predicted_for_bench(scenario, runner, device)}


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
    if args.classes:  # one count; several are bench_classes' report
        scenario.classes = args.classes[0]
    if args.skip_layers is not None:
        scenario.skip_layers = args.skip_layers
    if args.tokenizer:
        scenario.tokenizer = args.tokenizer
    if args.epoch_images:
        scenario.epoch_images = args.epoch_images
    requested = [m for m in (",".join(DEFAULT_MODES) if args.modes is None else args.modes).split(",") if m]
    finetune_kinds = [k for k in (args.finetune or "").split(",") if k]
    from skipkernels.train.step import STEP_KINDS
    if sorted(set(finetune_kinds) - set(STEP_KINDS)):
        raise ValueError(f"--finetune takes step kinds {STEP_KINDS}, got {sorted(set(finetune_kinds) - set(STEP_KINDS))}")
    from skipkernels.skip.tuner import MODES
    unknown = sorted(set(requested) - set(ALL_MODES) - set(MODES))
    if unknown:
        raise ValueError(f"unknown bench modes {unknown}; choose from {ALL_MODES} or a tuner mode {MODES}")
    if args.no_compile:
        requested = [m for m in requested if m not in BENCH_MODES
                     or not (BENCH_MODES[m].step == "compiled" or BENCH_MODES[m].compile_graphs)]
    modes, skipped = _available_modes(requested, device)
    print(f"bench on {device}: {scenario}", flush=True)
    results = measure_time(scenario, modes, device, args.repeats, args.warmup, not args.no_epoch)
    if not args.no_memory:
        for mode, mem in measure_memory(scenario, [m for m in modes if "step_s" in results[m]], device).items():
            results[mode]["memory"] = mem
    for mode, why in skipped.items():
        results[mode] = {"skipped": why}
    finetune = finetune_steady(scenario, finetune_kinds, device, Path(args.out), results) if finetune_kinds else None
    from skipkernels import bench_report
    return bench_report.write(results, scenario, device, args.repeats, args.warmup, Path(args.out), finetune)


# The bench mode that runs the step object and kernels of finetune's step kind (finetune's kernel
# policy is auto), and the shots of its runs: the fewest with one class per batch at batch 4, so an
# epoch is C steps at any class count.
FINETUNE_COUNTERPARTS = {"eager": "skip-kernels", "compiled": "skip-compile", "graph": "skip-graph"}
FINETUNE_SHOTS = 4


def write_image_folder(folder: Path, classnames, per_class: int, seed: int = 0) -> Path:
    """A plain image folder of random 32x32 PNGs, ``per_class`` per class (kept when present)."""
    import numpy as np
    from PIL import Image
    for label, name in enumerate(classnames):
        sub = folder / name
        if sub.is_dir() and len(list(sub.iterdir())) == per_class:
            continue
        sub.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = np.random.default_rng((seed, label, n)).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(sub / f"{n}.png")
    return folder


def steady_step_ms(steps: list[dict]) -> float:
    """Mean time a step (ms) over a run's last epoch, from its step log: the interval from its
    first step to its last, so steps queued ahead of a read-back are counted when they run."""
    last = max(s["epoch"] for s in steps)
    times = [s["time_s"] for s in steps if s["epoch"] == last]
    return 1e3 * (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")


def finetune_steady(scenario: Scenario, kinds, device, out: Path, results: dict, epochs: int = 2) -> dict:
    """``finetune``'s own steady step under each step kind, on an image folder of the scenario's
    classes (random images, FINETUNE_SHOTS each, all classes trained), beside the bench's time for
    the mode that runs the same step object (FINETUNE_COUNTERPARTS)."""
    import csv

    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.job import finetune
    from skipkernels.train.trainer import TrainConfig
    folder = write_image_folder(out / f"finetune-data-c{scenario.classes}", class_names(scenario.classes),
                                FINETUNE_SHOTS + 1)
    report = {}
    for kind in kinds:
        run = out / f"finetune-{kind}"
        done = finetune(folder, None, scenario.model, None, skip=SkipConfig(mode="skip", skip_layers=scenario.skip_layers),
                        train=TrainConfig(epochs=epochs, batch_size=scenario.batch, shots=FINETUNE_SHOTS, step=kind,
                                          warmup_epochs=0, progress=False),
                        out_dir=run, base_to_new=False, device=device, tokenizer=scenario.tokenizer, resume=False)
        with (run / "metrics.csv").open() as f:
            steps = [{"epoch": int(r["epoch"]), "time_s": float(r["time_s"])} for r in csv.DictReader(f)]
        counterpart = FINETUNE_COUNTERPARTS[done["step"].split(" ")[0]]
        bench_s = results.get(counterpart, {}).get("step_s", {}).get("median")
        ms = steady_step_ms(steps)
        report[kind] = {"step": done["step"], "steady_step_ms": ms, "epoch_steps": sum(s["epoch"] == epochs
                                                                                       for s in steps),
                        "bench_mode": counterpart, "bench_step_ms": None if bench_s is None else bench_s * 1e3,
                        "vs_bench": None if bench_s is None else ms / (bench_s * 1e3)}
    return report


# The modes of the class-scaling report (--classes C1,C2,...; skipkernels.bench_classes)
CLASS_SCALING_MODES = ("skip", "ft", "coop", "lora", "lskip-lora")


def class_counts(text: str) -> list[int]:
    """argparse type of ``--classes``: one count, or a comma-separated list of them."""
    from skipkernels.flags import positive_int
    counts = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not counts or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or a list of distinct ones, got {text!r}")
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    from skipkernels.flags import DEVICE_HELP, MODEL_HELP, positive_int
    p.add_argument("--modes", default=None, help="comma-separated modes: the bench's own "
                   f"({', '.join(ALL_MODES)}) or any finetune --mode (default: {','.join(DEFAULT_MODES)}; with "
                   "--inference or several --classes, those reports' own)")
    p.add_argument("--quick", action="store_true", help="tiny scenario (smoke test)")
    p.add_argument("--batch", type=positive_int, default=None, help="images per step (default: 4)")
    p.add_argument("--model", default=None, help=f"{MODEL_HELP}; its weights: the shipped ones, a hf: model's own, "
                                                 "else random (default: ViT-B-16 on a GPU, skipkernels-tiny on a "
                                                 "CPU or with --quick)")
    p.add_argument("--skip-layers", type=int, default=None, help="omega (default: half the blocks of the model's "
                   "shallower tower, 6 for ViT-B/16)")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the model's own)")
    p.add_argument("--classes", type=class_counts, default=None,
                   help="classes C (default: 500 on a GPU, 100 on a CPU, 12 with --quick); a comma-separated list "
                        "(e.g. 100,1000,10000,21841) reports training cost against C instead: step time, peak "
                        f"memory, K′ and set-up per mode ({','.join(CLASS_SCALING_MODES)} unless --modes), "
                        "classes-*.json and a log-log .png")
    p.add_argument("--epoch-images", type=positive_int, default=None, help="images of the timed epoch (default: 800 "
                                                                           "on a GPU, 400 on a CPU, 24 with --quick)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed steps per mode, the modes interleaved")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before the timed ones")
    p.add_argument("--no-epoch", action="store_true", help="no epoch timing (LSkip caching and the epoch's steps)")
    p.add_argument("--no-memory", action="store_true", help="no peak memory (measured in a subprocess per mode)")
    p.add_argument("--inference", action="store_true",
                   help="time image -> class logits per method instead (zero-shot, skip, ft, coop, vlpet-large, "
                        "adapter, lora, lora-merged, or --modes), batch 1 and 64 (--batch N: 1 and N), eager and "
                        "compiled: inference-*.json and .png")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile modes (skip-compile, "
                                                             "skip-compile-graphs)")
    p.add_argument("--finetune", default=None, metavar="KINDS",
                   help="also run `finetune` under these comma-separated step kinds (auto, eager, compiled, graph) "
                        f"on an image folder of the scenario's classes, {FINETUNE_SHOTS} shots, and report its "
                        "steady step beside the bench's time for the same step (default: none)")
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--out", default="bench/results", help="folder of the results JSON and chart, e2e-<tag>.json "
                                                          "and .png")


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
