"""The paper's evaluation as one resumable sweep of ``finetune`` runs, each in its own folder.

``OUT/<protocol>/<dataset>/seed<S>/shots<N>/<mode>/`` holds one run: ``sweep_run.json`` (the
settings it was started with), ``finetune``'s files (``results.json``, ``model.pt``, the
checkpoint), ``transfer.json`` (cross-dataset and DG: the accuracy on each target) and, where the
run failed, ``failed.json`` with the reason. A run that has finished with the same settings is
skipped; an interrupted one resumes from its checkpoint (``finetune`` does). A folder holding a run
made with other settings is never trained into: the sweep refuses it, unless told to start it over
(``replace``). Each run is claimed with a lock file (``locks``), so shards and repeated starts in
one folder never train a run twice.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from skipkernels.data.coop import DatasetError, load_splits, resolve_folder
from skipkernels.data.fewshot import base_new_labels
from skipkernels.options import identity_fields, identity_values
from skipkernels.reproduce import locks
from skipkernels.reproduce.protocols import PROTOCOL_FIELDS, PROTOCOLS, ZERO_SHOT, Run, steps_per_epoch
from skipkernels.train import run_folder
from skipkernels.train.checkpoint import CheckpointError, atomic_write_text
from skipkernels.train.evaluate import class_groups, evaluate_groups
from skipkernels.train.run_folder import RESULTS_NAME
from skipkernels.train.trainer import TrainConfig, autocast_dtype_for, protocol_epochs

SPEC_NAME = "sweep_run.json"
TRANSFER_NAME = "transfer.json"
FAILED_NAME = "failed.json"
# What a run's failure may be: anything a user's data, settings or machine can cause. Anything
# else is a bug and stops the sweep.
RUN_ERRORS = (DatasetError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError)
# What a folder can hold, as folder_state says.
EMPTY, FINISHED, UNFINISHED, FAILED, OTHER_SETTINGS = "empty", "finished", "unfinished", "failed", "other settings"
# The settings a zero-shot run's result depends on (it trains nothing), besides model and data.
ZERO_SHOT_SETTINGS = ("skip_config.template", "train_config.amp")


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
    protocol_fields: tuple = PROTOCOL_FIELDS
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
        return json.loads(json.dumps({
            "run": dataclasses.asdict(run), "model": self.model, "pretrained": self.pretrained,
            "tokenizer": self.tokenizer, "data": str(Path(self.data_root).expanduser().resolve()),
            "skip_config": identity_values(skip), "train_config": identity_values(train),
            "kernel_policy": None if self.policy is None else identity_values(self.policy),
        }, default=str))


# ------------------------------------------------------------------ a run's settings, compared
_MISSING = "(not recorded)"


def settings_of(spec: dict, trains: bool) -> dict:
    """The settings of a ``sweep_run.json`` that decide its run's result, flat
    (``{"train_config.lr": 2e-05, ...}``). A transfer run's targets are not among them: each target
    is evaluated on its own (``transfer.json``), so a rerun with more targets adds the new ones.
    Read by the fields this version records, so a field an older spec also held (``SkipConfig``'s
    ``cache_budget_gb``) that changes no result is left out."""
    from skipkernels.skip.tuner import SkipConfig
    run = spec.get("run") or {}
    flat = {f"run.{k}": run.get(k, _MISSING) for k in ("protocol", "dataset", "seed", "shots", "mode")}
    flat.update({k: spec.get(k, _MISSING) for k in ("model", "pretrained", "tokenizer", "data")})
    for section, cls in (("skip_config", SkipConfig), ("train_config", TrainConfig)):
        stored = spec.get(section) or {}
        flat.update({f"{section}.{f.name}": stored.get(f.name, _MISSING) for f in identity_fields(cls)})
    if not trains:
        flat = {k: v for k, v in flat.items() if not k.startswith(("skip_config.", "train_config."))
                or k in ZERO_SHOT_SETTINGS}
    return flat


def differences(there: dict, now: dict) -> list[str]:
    """``"key: <there> there, <now> now"`` for each setting that differs."""
    return [f"{key}: {there.get(key, _MISSING)!r} there, {now.get(key, _MISSING)!r} now"
            for key in dict.fromkeys([*now, *there]) if there.get(key, _MISSING) != now.get(key, _MISSING)]


def results_differences(spec: dict, results: dict, trains: bool) -> list[str]:
    """Where a trained run's ``results.json`` (its identity: what ran) disagrees with its
    ``sweep_run.json``: the folder's results are then another run's, and its numbers are not this
    run's. The weights are compared by the spec's path, not here (the identity holds their hash)."""
    identity = results.get("identity")
    if not trains or not isinstance(identity, dict):
        return []
    wanted = {k: v for k, v in settings_of(spec, trains).items()
              if not k.startswith("run.") and k != "pretrained" and k in identity}
    # The kernel policy is compared here only: specs of earlier versions did not record it.
    wanted.update({f"kernel_policy.{k}": v for k, v in (spec.get("kernel_policy") or {}).items()
                   if f"kernel_policy.{k}" in identity})
    return differences({k: identity[k] for k in wanted}, wanted)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_state(sweep: Sweep, run: Run) -> tuple[str, list[str]]:
    """What ``run``'s folder holds, and for ``OTHER_SETTINGS`` each setting that differs:

    - ``EMPTY``: nothing of a run;
    - ``OTHER_SETTINGS``: a run made with other settings (its ``sweep_run.json`` or its results say so);
    - ``FAILED``: this run, failed (``failed.json``): it is tried again;
    - ``FINISHED``: this run, finished, with every target evaluated;
    - ``UNFINISHED``: this run, interrupted: it resumes from its checkpoint.
    """
    folder = sweep.folder(run)
    spec = read_json(folder / SPEC_NAME)
    results = read_json(folder / RESULTS_NAME)
    has_run_files = any((folder / name).is_file() for name in run_folder.RUN_FILES)
    if spec is None and not has_run_files:
        return (FAILED if (folder / FAILED_NAME).is_file() else EMPTY), []
    if spec is None:  # finetune's files without the sweep's record of their settings
        return OTHER_SETTINGS, [f"{SPEC_NAME}: missing, so the settings of the run there are unknown"]
    wanted = sweep.spec(run)
    diffs = differences(settings_of(spec, run.trains), settings_of(wanted, run.trains))
    diffs += [d for d in results_differences(wanted, results or {}, run.trains) if d not in diffs]
    if diffs:
        return OTHER_SETTINGS, diffs
    if (folder / FAILED_NAME).is_file():
        return FAILED, []
    if not results or not results.get("finished") or (run.trains and not (folder / run_folder.MODEL_NAME).is_file()):
        return UNFINISHED, []
    if run.targets:
        transfer = read_json(folder / TRANSFER_NAME) or {}
        if not all("accuracy" in (transfer.get(t) or {}) for t in run.targets):
            return UNFINISHED, []
    return FINISHED, []


def clear_folder(folder: Path) -> list[str]:
    """Remove what a run wrote into ``folder`` (the lock aside); returns the names."""
    removed = run_folder.clear(folder)
    for name in (SPEC_NAME, TRANSFER_NAME, FAILED_NAME):
        if (folder / name).is_file():
            (folder / name).unlink()
            removed.append(name)
    return removed


def other_settings_message(out, mismatched: list[tuple[Run, list[str]]]) -> str:
    """One line: how many runs of the sweep hold other settings, which settings differ (most
    common first), and what to do."""
    counts = collections.Counter(d for _, diffs in mismatched for d in diffs)
    shown = [f"{d} ({n} run{'s' if n != 1 else ''})" for d, n in counts.most_common(4)]
    more = f"; and {len(counts) - 4} more" if len(counts) > 4 else ""
    first = mismatched[0][0].key
    return (f"--out {out} holds {len(mismatched)} of this sweep's runs made with other settings (first: {first}): "
            f"{'; '.join(shown)}{more}. Use --no-resume to train them again with these settings (replacing them), "
            "or another --out")


# ------------------------------------------------------------------ datasets
@dataclasses.dataclass
class Probe:
    """A dataset as the plan sees it: its class names and training images per class, or why it can't be used."""
    dataset: str
    folder: Path
    classes: int | None = None
    error: str | None = None
    classnames: tuple = ()
    train_per_class: dict = dataclasses.field(default_factory=dict)  # label -> training images


def probe(data_root, dataset: str) -> Probe:
    _, folder, _ = resolve_folder(data_root, dataset)
    try:
        splits = load_splits(data_root, dataset)
    except DatasetError as err:
        return Probe(dataset, folder, error=str(err))
    return Probe(dataset, folder, len(splits.classnames), classnames=tuple(splits.classnames),
                 train_per_class=dict(collections.Counter(item.label for item in splits.train)))


def _trained_labels(run: Run, found: Probe) -> list[int]:
    return base_new_labels(found.classes)[0] if PROTOCOLS[run.protocol].base_to_new else list(range(found.classes))


def shots_problem(run: Run, probes: dict) -> str | None:
    """Why ``run`` cannot draw its shots from its dataset (a class with fewer training images than
    the shots), or None. A zero-shot run draws none."""
    found = probes.get(run.dataset)
    if not run.trains or found is None or found.classes is None:
        return None
    short = [(found.train_per_class.get(label, 0), label) for label in _trained_labels(run, found)]
    short = sorted((n, label) for n, label in short if n < run.shots)
    if not short:
        return None
    n, label = short[0]
    return (f"{run.dataset} has fewer than {run.shots} training images in {len(short)} of the "
            f"{len(_trained_labels(run, found))} classes the run trains on (fewest: {found.classnames[label]!r} "
            f"with {n})")


def expected_steps(sweep: Sweep, run: Run, probes: dict) -> tuple[int, int | None]:
    """(epochs, training steps) of ``run``; steps None where the dataset can't be read. A zero-shot
    run trains nothing: (0, 0)."""
    if not run.trains:
        return 0, 0
    _, train = sweep.configs(run)
    found = probes.get(run.dataset)
    if found is None or found.classes is None:
        return train.epochs, None
    return train.epochs, train.epochs * steps_per_epoch(len(_trained_labels(run, found)), run.shots,
                                                         train.batch_size, train.same_class_batches)


# ------------------------------------------------------------------ one run
def _classifier(sweep: Sweep, run: Run, classnames, folder: Path):
    from skipkernels.prediction import load_classifier
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
    groups = class_groups(splits, "base2new" if PROTOCOLS[run.protocol].base_to_new else "all")
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
    done = read_json(path) or {}
    tuner = None
    for target in run.targets:
        if "accuracy" in (done.get(target) or {}):
            continue
        try:
            splits = load_splits(sweep.data_root, target)
            groups = class_groups(splits, "all")
            if tuner is None:
                tuner = _classifier(sweep, run, groups["all"][1], folder)
            done[target] = {"accuracy": _evaluate(sweep, tuner, groups)["all"], "classes": len(splits.classnames),
                            "test_items": len(splits.test)}
        except RUN_ERRORS as err:
            done[target] = {"error": f"{type(err).__name__}: {err}"}
        atomic_write_text(json.dumps(done, indent=2), path)
    return done


def execute(sweep: Sweep, run: Run, replace: bool = False, state: tuple[str, list[str]] | None = None) -> dict:
    """Run ``run`` in its folder (its lock held by the caller); returns its results. A folder
    holding the run made with other settings is refused (CheckpointError), or with ``replace``
    cleared first, as is one holding this run unfinished or failed. The folder's ``sweep_run.json``
    is written only once the folder is known to hold this run, so it never names settings its
    results were not made with. ``state``: ``folder_state`` of the run, read under its lock (None:
    read here)."""
    folder = sweep.folder(run)
    state, diffs = state if state is not None else folder_state(sweep, run)
    if state == OTHER_SETTINGS and not replace:
        raise CheckpointError(f"{folder} holds a run made with other settings ({'; '.join(diffs)}); use --no-resume "
                              "to train it again with these settings, or another --out")
    if replace and state in (OTHER_SETTINGS, UNFINISHED, FAILED):
        clear_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(sweep.spec(run), indent=2), folder / SPEC_NAME)
    (folder / FAILED_NAME).unlink(missing_ok=True)
    try:
        # a zero-shot run finished but for some targets keeps its result (finetune does so for a trained one)
        results = read_json(folder / RESULTS_NAME) if state == UNFINISHED and not run.trains else None
        if not (results or {}).get("finished"):
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
    transfer = results.get("transfer") or {}
    for target in run.targets:
        entry = transfer.get(target) or {}
        parts.append(f"{target} {entry['accuracy']:.2f}" if "accuracy" in entry else f"{target} failed")
    return ", ".join(parts)


def _target_errors(run: Run, results: dict) -> str | None:
    transfer = results.get("transfer") or {}  # may hold targets of an earlier run's list: not this run's
    errors = [f"{t}: {transfer[t]['error']}" for t in run.targets if "error" in (transfer.get(t) or {})]
    return "targets failed: " + "; ".join(errors) if errors else None


def run_sweep(sweep: Sweep, runs: list[Run], probes: dict, shard=(0, 1), replace: bool = False,
              states: dict | None = None) -> dict:
    """Every run of ``runs`` in this shard that is not finished and not held by another process.
    ``replace``: a run whose folder holds other settings, or this run unfinished or failed, starts
    over. ``states``: ``{run key: folder_state}`` of this shard's runs where the caller has read
    them (None: read here); each run's folder is read again once its lock is held. Returns
    {"done": [...], "skipped": [...], "held": [...], "failed": [{run, error}]} by run key: skipped
    are the runs finished before with these settings; a transfer run with a failed target is failed."""
    mine = shard_of(runs, shard)
    weights = {}
    for run in mine:
        steps = expected_steps(sweep, run, probes)[1]
        weights[run.key] = max(1, steps or 1)
    if states is None:
        states = {run.key: folder_state(sweep, run) for run in mine}
    finished = {run.key for run in mine if states[run.key][0] == FINISHED}
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
                              f"(host {lock.took_stale.get('host')}, pid {lock.took_stale.get('pid')}); taken over")
                missing = probes.get(run.dataset)
                start = time.perf_counter()
                try:
                    if missing is not None and missing.error is not None:
                        raise DatasetError(missing.error)
                    problem = shots_problem(run, probes)
                    if problem:  # refused before the model loads
                        raise DatasetError(f"cannot draw {run.shots} shots: {problem}")
                    state = folder_state(sweep, run)  # under the lock: another process may have run it meanwhile
                    if state[0] == FINISHED:
                        outcome["skipped"].append(run.key)
                        continue
                    results = execute(sweep, run, replace, state)
                except RUN_ERRORS as err:
                    message = f"{type(err).__name__}: {err}"
                    folder = sweep.folder(run)
                    # failed.json marks this run's folder; never one that holds another run
                    if not (folder / FAILED_NAME).is_file() and folder_state(sweep, run)[0] != OTHER_SETTINGS:
                        folder.mkdir(parents=True, exist_ok=True)
                        atomic_write_text(json.dumps({"run": run.key, "error": message}, indent=2),
                                          folder / FAILED_NAME)
                    outcome["failed"].append({"run": run.key, "error": message})
                    bar.write(f"[{n}/{len(mine)}] {run.key}: FAILED: {message}")
                else:
                    line = f"[{n}/{len(mine)}] {run.key}: {_outcome_line(run, results)}"
                    failed_targets = _target_errors(run, results)
                    if failed_targets:  # the targets that worked are kept; a rerun tries the others
                        outcome["failed"].append({"run": run.key, "error": failed_targets})
                        bar.write(f"{line}: FAILED: {failed_targets}")
                    else:
                        outcome["done"].append(run.key)
                        bar.write(f"{line} ({time.perf_counter() - start:.1f} s)")
                finally:
                    bar.update(weights[run.key])
    finally:
        bar.close()
    return outcome
