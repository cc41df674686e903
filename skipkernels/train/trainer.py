"""The training loop of the paper's protocol: ``TrainConfig`` and ``Trainer`` (checkpoints, resume,
per-epoch evaluation). The whole run (data, model, outputs) is ``skipkernels.train.job.finetune``."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from skipkernels import distributed
from skipkernels.checks import image_size
from skipkernels.data.coop import QUARTER_EPOCH_DATASETS
from skipkernels.data.images import ItemDataset, TrainTransform, epoch_batches, make_loader, preprocess_config
from skipkernels.ops.policy import deterministic_algorithms
from skipkernels.options import option
from skipkernels.skip.lskip import ImagePrefixCache, cache_on_device, keep_token_count
from skipkernels.skip.tuner import SkipTuner
from skipkernels.train import checkpoint
from skipkernels.train.memory import CpuAllocatorPeak, PeakMemory
from skipkernels.train.report import REPORT_TO, RunLog, check_report_to
from skipkernels.train.schedule import set_epoch_lr
from skipkernels.train.step import (STEP_KINDS, UPDATE_MODES, WORKING_COPY_MODES, choose_step, choose_update,
                                    choose_working_copies, make_step, optimizer_bytes)

CHECKPOINT_NAME = "checkpoint.pt"
MEMORY_PROBE_STEPS = 4  # CPU peak memory window; from step 2 on, gradients, momentum and activations coexist
PEAK_MEMORY_KINDS = {
    "cuda": "cuda max_memory_allocated",
    "cpu": f"cpu allocator peak in the first {MEMORY_PROBE_STEPS} steps above the level before them (torch.profiler)",
}


class _StepLoss(torch.nn.Module):
    """The tuner's loss as a module forward, so DistributedDataParallel can wrap a step."""

    def __init__(self, tuner):
        super().__init__()
        self.tuner = tuner

    def forward(self, inputs, labels):
        return self.tuner.loss(inputs, labels)


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message names where and the last good checkpoint."""


AMP_MODES = ("auto", "bf16", "fp16", None)  # "auto": bf16 autocast on GPU, fp32 on CPU (autocast_dtype_for)


# Each field's option() is also its command-line flag (skipkernels.options, skipkernels.cli).
@dataclasses.dataclass
class TrainConfig:
    epochs: int = option(20, "training epochs")
    batch_size: int = option(4, "images per batch")
    lr: float = option(2e-5, "learning rate of all but the image tower (text tower, CoOp's context, PET modules)")
    lr_image: float = option(5e-6, "learning rate of the image tower")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "SGD weight decay")
    warmup_epochs: int = option(1, "epochs at the warmup learning rate, before the cosine schedule")
    warmup_lr: float = option(1e-6, "learning rate during warmup")
    shots: int = option(16, "images per class (<= 0: all)")
    # None: the protocol's rule, one class per batch for shots >= 4
    same_class_batches: bool | None = option(None, "batches mix classes (the protocol puts one class per batch "
                                             "for shots >= 4)", flag="--mixed-batches", const=False)
    seed: int = option(1, "seed of the few-shot sample, batches and augmentation (command line: CSkip's too)")
    # identity=False: a run's folder may be resumed with another value (skipkernels.options)
    workers: int = option(0, "data loader workers", identity=False)
    cache_batch_size: int = option(64, "images per batch when the LSkip image cache is built", identity=False)
    eval_batch_size: int = option(64, "images per batch when evaluating", identity=False)
    amp: str | None = option("auto", "autocast: auto is bf16 on GPU, fp32 on CPU; none is fp32", choices=AMP_MODES)
    progress: bool = option(True, "progress bars", identity=False)
    # stop early (checkpoint kept), e.g. to test resume; a test's setting, not the command line's
    stop_after_epochs: int | None = option(None, cli=False, identity=False)
    eval_every: int = option(0, "also evaluate every N epochs (history and training.png); 0: only at the end",
                             identity=False)
    # Deterministic algorithms only. On CPU runs are reproducible anyway; on GPUs the backward of
    # index/gather ops (atomics) and flash / memory-efficient attention are not bit-reproducible.
    deterministic: bool = option(False, "deterministic algorithms only (torch.use_deterministic_algorithms)")
    # metrics.csv is always written, every epoch; this adds a logger of the same numbers (train/report.py)
    report_to: str | None = option(None, "also log the training numbers to tensorboard (OUT/tensorboard; needs "
                                   "the tensorboard package), or none", choices=REPORT_TO, identity=False)
    # Not part of the run's identity: each kind computes the same maths (train/step.py), so a run
    # resumed under another kind continues.
    step: str = option("auto", "how each step runs: eager, compiled (torch.compile), graph (a CUDA graph), or "
                       "auto (graph where it can run, else compiled on CUDA, else eager; the choice is printed)",
                       choices=STEP_KINDS, identity=False)
    # Not part of the run's identity either: the update in backward is bit-identical to optimizer.step().
    update_in_backward: str = option("auto", "run SGD's update on each tensor as soon as its gradient is complete "
                                     "and free the gradient (no gradient buffer; bit-identical): auto (where it "
                                     "can run: eager and compiled steps, one process; the choice is printed), "
                                     "on or off", choices=UPDATE_MODES, identity=False)
    # Not part of the run's identity: the copies hold the bits autocast's casts would (bit-identical).
    working_copies: str = option("auto", "keep the GEMM weights' autocast-dtype copies across steps: frozen ones "
                                 "cast once an epoch, trained ones written by their update (bit-identical to "
                                 "autocast's per-step casts): auto (under autocast, eager and compiled steps; "
                                 "the choice is printed), on or off", choices=WORKING_COPY_MODES,
                                 identity=False)
    log_every: int = option(50, "read the step losses back to the host every N steps and at each epoch's end "
                            "(a non-finite loss stops training at the next read-back)", identity=False)

    def __post_init__(self):
        if self.report_to == "none":
            self.report_to = None
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO} ('none' for None), got {self.report_to!r}")
        if self.amp == "none":  # one spelling of fp32, so the API's "none" and the CLI's are one run
            self.amp = None
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.shots > 0 and self.batch_size > self.shots and self.same_class_batches is not False \
                and self.shots >= 4:
            raise ValueError(f"batch_size {self.batch_size} is larger than the {self.shots} shots per class, "
                             "but batches hold one class each (the protocol for shots >= 4); lower the batch "
                             "size or pass same_class_batches=False")
        if not self.lr > 0 or not self.lr_image > 0:
            raise ValueError("learning rates must be > 0")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.step not in STEP_KINDS:
            raise ValueError(f"step must be one of {STEP_KINDS}, got {self.step!r}")
        if self.update_in_backward not in UPDATE_MODES:
            raise ValueError(f"update_in_backward must be one of {UPDATE_MODES}, got {self.update_in_backward!r}")
        if self.working_copies not in WORKING_COPY_MODES:
            raise ValueError(f"working_copies must be one of {WORKING_COPY_MODES}, got {self.working_copies!r}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def protocol_epochs(dataset: str, epochs: int) -> int:
    """The paper trains ImageNet, SUN397 and Food101 for a quarter of the epochs."""
    return max(1, epochs // 4) if dataset in QUARTER_EPOCH_DATASETS else epochs


def autocast_dtype_for(amp, device):
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _signature(tuner: SkipTuner, model_name: str, train: TrainConfig) -> dict:
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in tuner.trainable_named_parameters())
    return {"model": model_name, "mode": tuner.config.mode, "skip_layers": tuner.config.skip_layers,
            "classes": hashlib.sha1("\n".join(tuner.classnames).encode()).hexdigest()[:12],
            "trainable": hashlib.sha1(shapes.encode()).hexdigest()[:12], "seed": train.seed,
            "epochs": train.epochs, "batch_size": train.batch_size}


class Trainer:
    """Fine-tunes a SkipTuner on few-shot items; checkpoints every epoch into ``out_dir``."""

    def __init__(self, tuner: SkipTuner, train_items, config: TrainConfig, out_dir=None, model_name: str = "",
                 evaluate=None, identity: dict | None = None):
        """``evaluate()``, when given, returns test accuracies; it runs every ``config.eval_every``
        epochs before the last, and its result goes into that epoch's history record.
        ``identity``: the run's identity (``run_folder.run_identity``), recorded in each checkpoint."""
        if not train_items:
            raise ValueError("no training items")
        num_classes = len(tuner.classnames)
        bad = [it for it in train_items if not 0 <= it.label < num_classes]
        if bad:
            raise ValueError(f"training label {bad[0].label} of {bad[0].path} is outside [0, {num_classes})")
        self.tuner = tuner
        self.items = list(train_items)
        self.config = config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.model_name = model_name
        self.evaluate = evaluate
        self.device = tuner.device
        self.autocast_dtype = autocast_dtype_for(config.amp, self.device)
        # PyTorch's deterministic algorithms for the length of train() only; the process's own
        # setting is restored after.
        self.deterministic = config.deterministic
        check_report_to(config.report_to)  # before any training: the logger's package is there
        if config.report_to is not None and self.out_dir is None:
            raise ValueError(f"report_to={config.report_to!r} logs into the run's folder: give an out_dir")
        size, mean, std = preprocess_config(tuner.model)
        self.dataset = ItemDataset(self.items, TrainTransform(size, mean, std), seed=config.seed)
        self.labels = [it.label for it in self.items]
        same = config.same_class_batches
        self.same_class = (config.shots >= 4) if same is None else same
        self.optimizer = torch.optim.SGD(tuner.parameter_groups(config.lr, config.lr_image, config.weight_decay),
                                         lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.start_epoch = 0
        self.history: list[dict] = []
        self.steps: list[dict] = []  # per step: METRICS_COLUMNS of skipkernels.plots (this rank's loss)
        self.times = {"cache": 0.0, "train": 0.0}
        self.peak_train_bytes: int | None = None  # None: not measured
        self.cache_bytes = 0
        self.signature = _signature(tuner, model_name, config)
        self.identity = identity
        self.step_module = _StepLoss(tuner)
        if distributed.enabled():
            # Gradients are averaged over ranks; each rank's loss is weighted by its share of the
            # global batch (see train()), so the update equals a single process on the global batch.
            self.step_module = distributed.data_parallel(self.step_module, self.device)
        # decided once, before any training: a forced kind that cannot run is refused here
        self.step_choice = choose_step(config.step, tuner, self.optimizer, config.batch_size,
                                       self._memory_left_for_steps())
        self.update_choice = choose_update(config.update_in_backward, self.step_choice.kind, self.optimizer)
        self.working_copies_choice = choose_working_copies(config.working_copies, self.step_choice.kind,
                                                           self.autocast_dtype)
        self.train_step = make_step(self.step_choice, tuner, self.optimizer, self.autocast_dtype, self.step_module,
                                    self.update_choice, self.working_copies_choice)

    def _memory_left_for_steps(self) -> int | None:
        """On CUDA, the device's bytes the steps will have (what ``--step auto`` weighs the graph
        step's gradients against): free now, plus the frozen prefix weights that go to the host
        between caching passes, less the momentum still to be made and the epoch's LSkip image
        cache where it will be on the device. None elsewhere."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        tuner = self.tuner
        leaving = sum(part.nbytes for part in tuner.prefix_offload.values() if not part.offloaded)
        return free + leaving - optimizer_bytes(self.optimizer) - self._image_cache_bytes_on_device()

    def _image_cache_bytes_on_device(self) -> int:
        """The epoch's LSkip image cache where it lives on the device (``lskip.cache_on_device``):
        every training item's tokens at block ω, as many as token dropping keeps, of the stem's width."""
        tuner = self.tuner
        if not tuner.plan.caches_prefix:
            return 0
        height, width = image_size(tuner.model)
        image = tuner.towers.image
        with torch.no_grad(), tuner.prefix_on_device("image"):
            tokens = image.stem(torch.zeros(1, 3, height, width, device=self.device, dtype=tuner.dtype))[0]
        kept = keep_token_count(tokens.shape[0], tuner.config.drop_ratio, image.tower.prefix_tokens)
        nbytes = len(self.items) * kept * tokens.shape[1] * torch.empty((), dtype=tuner.cache_dtype).element_size()
        return nbytes if cache_on_device(nbytes, self.device.type, tuner.config.cache_budget_gb * (1 << 30)) else 0

    # -------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self):
        return None if self.out_dir is None else self.out_dir / CHECKPOINT_NAME

    def save_checkpoint(self, epoch_done: int) -> None:
        if self.checkpoint_path is None or not distributed.is_main():
            distributed.barrier()
            return
        state = {"epoch": epoch_done, "signature": self.signature, "identity": self.identity,
                 "trainable": {n: p.detach().cpu() for n, p in self.tuner.trainable_named_parameters()},
                 "optimizer": self.optimizer.state_dict(), "tuner": self.tuner.extra_state(),
                 "history": self.history, "steps": self.steps, "times": self.times,
                 # whatever the step draws from torch's global RNG (e.g. a PET module's dropout)
                 # continues after a resume as it would have without the stop
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}
        checkpoint.atomic_save(state, self.checkpoint_path)
        distributed.barrier()

    def resume(self, path=None) -> bool:
        """Continue from ``path`` (default: the out_dir checkpoint). False when there is none."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is not None and distributed.is_main():
            for stale in path.parent.glob(f".{path.name}.*"):  # a write killed before its rename
                stale.unlink(missing_ok=True)
        distributed.barrier()
        if path is None or not path.is_file():
            return False
        state = checkpoint.load(path)
        if not isinstance(state, dict) or "signature" not in state:
            raise checkpoint.CheckpointError(f"{path} is not a skipkernels training checkpoint")
        checkpoint.check_signature(state["signature"], self.signature, path)
        params = dict(self.tuner.trainable_named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.tuner.load_extra_state(state["tuner"])
        self.start_epoch = state["epoch"]
        self.history = state["history"]
        self.steps = state.get("steps", [])  # checkpoints from before the step log have none
        self.times = state["times"]
        if state.get("torch_rng") is not None:  # checkpoints from before it have none
            torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True

    # -------------------------------------------------------------- training
    def _global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (identical on every rank); each rank trains on its share."""
        size = self.config.batch_size * distributed.world_size()
        batches = epoch_batches(self.labels, size, self.same_class, self.config.seed, epoch)
        # every rank needs a share of each batch to take part in the collectives
        return [b for b in batches if len(b) >= distributed.world_size()]

    def _cache_epoch(self, epoch: int, batches):
        self.dataset.set_epoch(epoch)
        dataset = self.dataset
        if distributed.enabled():  # each rank caches only the items of its shares
            mine = sorted({i for b in batches for i in b[slice(*distributed.split_batch(b))]})
            dataset = torch.utils.data.Subset(self.dataset, mine)
        loader = make_loader(dataset, self.config.cache_batch_size, self.config.workers)
        gen = torch.Generator().manual_seed(self.config.seed * 7919 + epoch)
        cache = ImagePrefixCache.build(self.tuner.towers.image, loader, self.tuner.skip_layers, self.device,
                                       self.tuner.cache_dtype, self.tuner.config.drop_ratio, gen,
                                       int(self.tuner.config.cache_budget_gb * (1 << 30)), self.config.progress,
                                       self.autocast_dtype, description=f"cache epoch {epoch + 1}")
        self.cache_bytes = cache.nbytes
        return cache

    def _batches(self, epoch: int, batches, cache):
        """Yields (this rank's item indices, inputs, labels, loss weight) for every global batch.
        The weight (local size * world / global size) makes the rank-averaged gradient equal the
        gradient of the mean loss over the global batch, also when shares differ in size."""
        world = distributed.world_size()
        local = [b[slice(*distributed.split_batch(b))] for b in batches]
        weights = [len(mine) * world / len(b) for mine, b in zip(local, batches)]
        if cache is not None:
            # host labels for the eager step (the tuner checks them there), device labels for the
            # static steps, which read no values
            for indices, weight, (tokens, labels, device_labels) in zip(local, weights, cache.epoch_batches(local)):
                yield indices, tokens, labels, device_labels, weight
        else:
            self.dataset.set_epoch(epoch)
            loader = make_loader(self.dataset, workers=self.config.workers, batch_sampler=local)
            for (images, labels, _), indices, weight in zip(loader, local, weights):
                yield indices, images.to(self.device, non_blocking=True), labels, None, weight

    def train(self) -> list[dict]:
        # metrics.csv, appended every epoch, and report_to's logger: the main rank of a run with a folder
        log = RunLog(self.out_dir, self.config.report_to, self.steps, self.history) \
            if self.out_dir is not None and distributed.is_main() else None
        try:
            with deterministic_algorithms(self.deterministic):
                return self._train(log)
        finally:
            # whatever reads the model after training (evaluation, export, state_dict) sees it whole
            self.tuner.restore_prefix()
            if log is not None:
                log.close()

    def _train(self, log: RunLog | None = None) -> list[dict]:
        cfg = self.config
        tuner = self.tuner
        last_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, cfg.stop_after_epochs)
        epochs = tqdm(range(self.start_epoch, last_epoch), desc=f"{tuner.config.mode} epochs",
                      disable=not cfg.progress, initial=self.start_epoch, total=cfg.epochs)
        for epoch in epochs:
            first_step = len(self.steps)
            set_epoch_lr(self.optimizer, epoch, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr)
            self.train_step.epoch_started()
            tuner.model.train()
            batches = self._global_batches(epoch)
            cache = None
            if tuner.plan.caches_prefix:
                start = time.perf_counter()
                tuner.model.eval()  # the frozen prefix runs in inference mode
                tuner.restore_prefix("image")  # the text prefix was cached once, at set-up
                cache = self._cache_epoch(epoch, batches)
                # the steps run from the caches: the frozen prefix waits in host memory
                tuner.offload_prefix()
                tuner.model.train()
                self.times["cache"] += time.perf_counter() - start
            start = time.perf_counter()
            totals = [0.0, 0]  # sum of per-item losses and items, on the host
            pending = []  # steps whose losses are still on the device
            # CUDA: the allocator's peak over every epoch. CPU: the allocator's peak over the first
            # steps this process trains, from the profiler's allocation events (an RSS delta would
            # not be one: the allocator reuses freed memory); the profiler's own time is left out.
            cpu_probe = CpuAllocatorPeak(MEMORY_PROBE_STEPS) \
                if self.device.type == "cpu" and epoch == self.start_epoch else None
            meter = PeakMemory(self.device) if self.device.type == "cuda" else cpu_probe or contextlib.nullcontext()
            with meter:
                static_labels = self.train_step.kind != "eager"
                for step, (indices, inputs, labels, device_labels, weight) in \
                        enumerate(self._batches(epoch, batches, cache)):
                    use = device_labels if static_labels and device_labels is not None else labels
                    loss = self.train_step(inputs, use, weight)  # queued: no host read here
                    if cpu_probe is not None:
                        cpu_probe.step_done()
                    probe_s = cpu_probe.overhead_s if cpu_probe is not None else 0.0
                    pending.append((loss, step, indices, self.times["cache"] + self.times["train"]
                                    + time.perf_counter() - start - probe_s))
                    if len(pending) >= cfg.log_every:
                        self._read_back(pending, epoch, totals)
                self._read_back(pending, epoch, totals)
            self.train_step.epoch_ended()  # its working copies freed until the next epoch's first step
            loss_total, item_count = totals
            loss_sum = distributed.all_reduce_sum(torch.tensor([loss_total, item_count], dtype=torch.float64))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.times["train"] += time.perf_counter() - start - (cpu_probe.overhead_s if cpu_probe else 0.0)
            if self.device.type == "cuda":
                self.peak_train_bytes = max(self.peak_train_bytes or 0, meter.peak_bytes)
            elif cpu_probe is not None:
                self.peak_train_bytes = cpu_probe.peak_bytes
            record = {"epoch": epoch + 1, "loss": float(loss_sum[0] / max(1.0, float(loss_sum[1]))),
                      "lr": self.optimizer.param_groups[0]["lr"]}
            done = epoch + 1
            if self.evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.epochs:
                start = time.perf_counter()  # outside train time; the caller evaluates the last epoch
                with tuner.prefix_on_device():  # the whole towers run on the test images
                    record["accuracy"] = self.evaluate()
                self.times["epoch_eval"] = self.times.get("epoch_eval", 0.0) + time.perf_counter() - start
            self.history.append(record)
            epochs.set_postfix(loss=f"{record['loss']:.4f}")
            del cache
            self.save_checkpoint(epoch + 1)
            if log is not None:  # after the checkpoint: a resumed run rewrites the file from its steps
                log.epoch_done(self.steps[first_step:], record)
        return self.history

    def _read_back(self, pending: list, epoch: int, totals: list) -> None:
        """The pending steps' losses in one transfer: the step log, the epoch's sums, and the stop
        on a non-finite loss (named by its epoch, step and items; every rank stops together)."""
        if not pending:
            return
        values = torch.stack([loss.float() for loss, *_ in pending]).tolist()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        stop = bad is not None
        if distributed.enabled():
            stop = float(distributed.all_reduce_sum(torch.tensor([float(stop)]))) > 0
        if stop:
            good = self.checkpoint_path if (self.checkpoint_path and self.checkpoint_path.is_file()) \
                else "none written yet"
            where = (f"non-finite loss {values[bad]} at epoch {epoch + 1}, step {pending[bad][1]} (training items "
                     f"{pending[bad][2]} on rank {distributed.rank()})") if bad is not None else \
                f"a non-finite loss on another rank in epoch {epoch + 1}"
            raise TrainingError(f"{where}; last good checkpoint: {good}")
        for value, (_, _, indices, time_s) in zip(values, pending):
            totals[0] += value * len(indices)
            totals[1] += len(indices)
            # the last parameter group holds the main lr (text tower; the only one in CoOp/PET)
            self.steps.append({"step": len(self.steps) + 1, "epoch": epoch + 1, "loss": value,
                               "lr": self.optimizer.param_groups[-1]["lr"], "time_s": time_s})
        pending.clear()
