"""The paper's evaluation as one resumable sweep of ``finetune`` runs, each in its own folder.

``OUT/<protocol>/<dataset>/seed<S>/shots<N>/<mode>/`` holds one run: ``sweep_run.json`` (the
settings it was started with), ``finetune``'s files (``results.json``, ``model.pt``, the
checkpoint), ``transfer.json`` (cross-dataset and DG: the accuracy on each target) and, where the
run failed, ``failed.json`` with the reason. A run that has finished with the same settings is
skipped; an interrupted one resumes from its checkpoint (``finetune`` does). Each run is claimed
with a lock file (``locks``), so shards and repeated starts in one folder never train a run twice.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from skipkernels.data.coop import DatasetError, load_splits, resolve_folder
from skipkernels.data.fewshot import base_new_labels
from skipkernels.options import identity_fields
from skipkernels.reproduce import locks
from skipkernels.reproduce.protocols import PROTOCOLS, ZERO_SHOT, Run, steps_per_epoch
from skipkernels.train.checkpoint import atomic_write_text
from skipkernels.train.evaluate import class_group, evaluate_groups
from skipkernels.train.run_folder import RESULTS_NAME
from skipkernels.train.trainer import autocast_dtype_for, protocol_epochs

SPEC_NAME = "sweep_run.json"
TRANSFER_NAME = "transfer.json"
FAILED_NAME = "failed.json"
# What a run's failure may be: anything a user's data, settings or machine can cause. Anything
# else is a bug and stops the sweep.
RUN_ERRORS = (DatasetError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError)


@dataclasses.dataclass
class Sweep:
    """What every run of a sweep shares: the data, the model and the finetune settings. ``train``
    holds the user's settings; the fields in ``protocol_fields`` are left to the protocol."""
    data_root: Path
    out: Path
    model: str
    pretrained: str | None
    tokenizer: str | None
    skip: object            # SkipConfig
    train: object           # TrainConfig
    policy: object = None   # KernelPolicy
    device: object = None   # torch.device
    protocol_fields: tuple = ("epochs", "lr", "lr_image", "warmup_epochs", "warmup_lr")
    progress: bool = True

    def folder(self, run: Run) -> Path:
        return self.out / run.key

    def configs(self, run: Run):
        """The SkipConfig and TrainConfig of ``run``: the protocol's settings where the user set
        none, the run's seed, shots and mode, a quarter of the epochs for the large datasets."""
        protocol = PROTOCOLS[run.protocol]
        values = {k: v for k, v in protocol.train.items() if k in self.protocol_fields}
        epochs = protocol_epochs(run.dataset, values.get("epochs", self.train.epochs))
        train = dataclasses.replace(self.train, **{**values, "epochs": epochs, "shots": run.shots,
                                                   "seed": run.seed, "progress": False})
        mode = "ft" if run.mode == ZERO_SHOT else run.mode
        skip = dataclasses.replace(self.skip, mode=mode)
        return skip, train

    def spec(self, run: Run) -> dict:
        """What ``sweep_run.json`` records: the run and every setting that changes its result."""
        skip, train = self.configs(run)
        fields = {f.name for f in identity_fields(type(train))}
        return json.loads(json.dumps({
            "run": dataclasses.asdict(run), "model": self.model, "pretrained": self.pretrained,
            "tokenizer": self.tokenizer, "data": str(Path(self.data_root).expanduser().resolve()),
            "skip_config": dataclasses.asdict(skip),
            "train_config": {k: v for k, v in dataclasses.asdict(train).items() if k in fields},
        }, default=str))


# ------------------------------------------------------------------ datasets
@dataclasses.dataclass
class Probe:
    """A dataset as the plan sees it: its classes and training images per class, or why it can't be used."""
    dataset: str
    folder: Path
    classes: int | None = None
    error: str | None = None


def probe(data_root, dataset: str) -> Probe:
    _, folder, _ = resolve_folder(data_root, dataset)
    try:
        splits = load_splits(data_root, dataset)
    except DatasetError as err:
        return Probe(dataset, folder, error=str(err))
    return Probe(dataset, folder, len(splits.classnames))


def expected_steps(sweep: Sweep, run: Run, probes: dict) -> tuple[int, int | None]:
    """(epochs, training steps) of ``run``; steps None where the dataset can't be read. A zero-shot
    run trains nothing: (0, 0)."""
    if not run.trains:
        return 0, 0
    _, train = sweep.configs(run)
    found = probes.get(run.dataset)
    if found is None or found.classes is None:
        return train.epochs, None
    classes = base_new_labels(found.classes)[0] if PROTOCOLS[run.protocol].base_to_new else range(found.classes)
    return train.epochs, train.epochs * steps_per_epoch(len(classes), run.shots, train.batch_size,
                                                         train.same_class_batches)


def test_groups(splits, base_to_new: bool) -> dict:
    """The test groups ``evaluate_groups`` scores: base and new, or all classes."""
    if base_to_new:
        base, new = base_new_labels(len(splits.classnames))
        return {"base": class_group(splits.test, splits.classnames, base),
                "new": class_group(splits.test, splits.classnames, new)}
    return {"all": class_group(splits.test, splits.classnames, list(range(len(splits.classnames))))}


# ------------------------------------------------------------------ one run
def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_finished(sweep: Sweep, run: Run) -> bool:
    """The run's folder holds this run (same settings), finished, with every target evaluated."""
    folder = sweep.folder(run)
    results = _read_json(folder / RESULTS_NAME)
    if _read_json(folder / SPEC_NAME) != sweep.spec(run) or not results or not results.get("finished"):
        return False
    if run.trains and not (folder / "model.pt").is_file():
        return False
    if run.targets:
        transfer = _read_json(folder / TRANSFER_NAME) or {}
        return all("accuracy" in (transfer.get(t) or {}) for t in run.targets)
    return True


def _classifier(sweep: Sweep, run: Run, classnames, folder: Path):
    from skipkernels.predict import load_classifier
    skip, _ = sweep.configs(run)
    if run.trains:
        return load_classifier(classnames, checkpoint=str(folder), device=sweep.device, tokenizer=sweep.tokenizer)
    return load_classifier(classnames, sweep.model, pretrained=sweep.pretrained, device=sweep.device,
                           template=skip.template, tokenizer=sweep.tokenizer)


def _evaluate(sweep: Sweep, tuner, groups: dict) -> dict:
    train = sweep.train
    return evaluate_groups(tuner, groups, train.eval_batch_size, train.workers,
                           autocast_dtype_for(train.amp, tuner.device), progress=False)


def _zero_shot(sweep: Sweep, run: Run, folder: Path) -> dict:
    """results.json of a zero-shot run: the pretrained model on the run's test classes."""
    start = time.perf_counter()
    splits = load_splits(sweep.data_root, run.dataset, run.shots, run.seed)
    groups = test_groups(splits, PROTOCOLS[run.protocol].base_to_new)
    tuner = _classifier(sweep, run, groups[next(iter(groups))][1], folder)
    accuracy = _evaluate(sweep, tuner, groups)
    results = {"dataset": splits.name, "model": sweep.model, "pretrained": sweep.pretrained, "mode": ZERO_SHOT,
               "finished": True, "accuracy": accuracy, "time_s": {"eval": time.perf_counter() - start},
               "peak_train_memory_mb": None, "trainable_params": 0, "classnames": splits.classnames,
               "device": str(tuner.device)}
    atomic_write_text(json.dumps(results, indent=2), folder / RESULTS_NAME)
    return results


def _train(sweep: Sweep, run: Run, folder: Path) -> dict:
    from skipkernels.train.job import finetune
    skip, train = sweep.configs(run)
    return finetune(sweep.data_root, run.dataset, sweep.model, sweep.pretrained, skip, train, folder,
                    base_to_new=PROTOCOLS[run.protocol].base_to_new, device=sweep.device, resume=True,
                    tokenizer=sweep.tokenizer, policy=sweep.policy)


def _transfer(sweep: Sweep, run: Run, folder: Path) -> dict:
    """Each target's accuracy with the run's model (the tuned one, or the pretrained one for
    zero-shot), by encoding the target's class names. A target that fails is recorded with its
    error and the others go on; targets evaluated before are kept."""
    path = folder / TRANSFER_NAME
    done = _read_json(path) or {}
    tuner = None
    for target in run.targets:
        if "accuracy" in (done.get(target) or {}):
            continue
        try:
            splits = load_splits(sweep.data_root, target)
            groups = test_groups(splits, False)
            if tuner is None:
                tuner = _classifier(sweep, run, groups["all"][1], folder)
            done[target] = {"accuracy": _evaluate(sweep, tuner, groups)["all"], "classes": len(splits.classnames),
                            "test_items": len(splits.test)}
        except RUN_ERRORS as err:
            done[target] = {"error": f"{type(err).__name__}: {err}"}
        atomic_write_text(json.dumps(done, indent=2), path)
    return done


def execute(sweep: Sweep, run: Run) -> dict:
    """Run ``run`` in its folder (its lock held by the caller); returns its results."""
    folder = sweep.folder(run)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(sweep.spec(run), indent=2), folder / SPEC_NAME)
    (folder / FAILED_NAME).unlink(missing_ok=True)
    try:
        results = _train(sweep, run, folder) if run.trains else _zero_shot(sweep, run, folder)
        if run.targets:
            results = {**results, "transfer": _transfer(sweep, run, folder)}
    except RUN_ERRORS as err:
        failure = {"run": run.key, "error": f"{type(err).__name__}: {err}"}
        atomic_write_text(json.dumps(failure, indent=2), folder / FAILED_NAME)
        raise
    return results


# ------------------------------------------------------------------ the sweep
def shard_of(runs: list[Run], shard: tuple[int, int]) -> list[Run]:
    """Every N-th run starting at K (``--shard K/N``)."""
    k, n = shard
    return runs[k::n]


def _outcome_line(run: Run, results: dict) -> str:
    acc = results.get("accuracy") or {}
    parts = [f"{k} {v:.2f}" for k, v in acc.items()]
    for target, entry in (results.get("transfer") or {}).items():
        parts.append(f"{target} {entry['accuracy']:.2f}" if "accuracy" in entry else f"{target} failed")
    return ", ".join(parts)


def run_sweep(sweep: Sweep, runs: list[Run], probes: dict, shard=(0, 1)) -> dict:
    """Every run of ``runs`` in this shard that is not finished and not held by another process.
    Returns {"done": [...], "skipped": [...], "held": [...], "failed": [{run, error}]} by run key."""
    mine = shard_of(runs, shard)
    weights = {}
    for run in mine:
        steps = expected_steps(sweep, run, probes)[1]
        weights[run.key] = max(1, steps or 1)
    finished = {run.key for run in mine if is_finished(sweep, run)}
    outcome = {"done": [], "skipped": sorted(finished), "held": [], "failed": []}
    bar = tqdm(total=sum(weights.values()), initial=sum(weights[k] for k in finished), unit="step",
               desc=f"sweep {shard[0]}/{shard[1]}" if shard[1] > 1 else "sweep", disable=not sweep.progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for n, run in enumerate(mine, 1):
            if run.key in finished:
                continue
            bar.set_postfix_str(run.key)
            lock = locks.RunLock(sweep.folder(run))
            if not lock.claim():
                outcome["held"].append(run.key)
                bar.write(f"[{n}/{len(mine)}] {run.key}: held by another process ({lock.holder()}); left to it")
                bar.update(weights[run.key])
                continue
            with lock:
                if lock.took_stale:
                    bar.write(f"[{n}/{len(mine)}] {run.key}: its lock was left by a process that is gone "
                              f"(host {lock.took_stale.get('host')}, pid {lock.took_stale.get('pid')}); resuming")
                missing = probes.get(run.dataset)
                start = time.perf_counter()
                try:
                    if missing is not None and missing.error is not None:
                        raise DatasetError(missing.error)
                    if is_finished(sweep, run):  # finished by another process meanwhile
                        outcome["skipped"].append(run.key)
                        continue
                    results = execute(sweep, run)
                except RUN_ERRORS as err:
                    message = f"{type(err).__name__}: {err}"
                    folder = sweep.folder(run)
                    if not (folder / FAILED_NAME).is_file():
                        atomic_write_text(json.dumps({"run": run.key, "error": message}, indent=2),
                                          folder / FAILED_NAME)
                    outcome["failed"].append({"run": run.key, "error": message})
                    bar.write(f"[{n}/{len(mine)}] {run.key}: FAILED: {message}")
                else:
                    outcome["done"].append(run.key)
                    bar.write(f"[{n}/{len(mine)}] {run.key}: {_outcome_line(run, results)} "
                              f"({time.perf_counter() - start:.1f} s)")
                finally:
                    bar.update(weights[run.key])
    finally:
        bar.close()
    return outcome
