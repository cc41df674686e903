"""A run's folder holds one run: its identity, checked before any work.

The identity is every setting that changes the trained weights or the reported result: the model,
its pretrained weights (a local file by its content's hash), the tokenizer, the data (folder,
dataset, split, and digests of the training sample and the test sets), every identity field of
``SkipConfig``, ``TrainConfig`` and the ``KernelPolicy`` (all but those declared
``option(..., identity=False)``: workers, progress bars, batch sizes of caching and evaluation),
the autocast dtype it resolves to and the world size. ``checkpoint.pt`` and ``results.json``
record it; a later run into the same folder must have the same one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from skipkernels.options import identity_values
from skipkernels.train import checkpoint
from skipkernels.train.report import TENSORBOARD_DIR

RESULTS_NAME = "results.json"
MODEL_NAME = "model.pt"
# What a run writes into its folder (split_zhou_*.json aside): a fresh start removes them all.
# pet.pt and prompt_learner.pt are what earlier versions wrote beside model.pt.
RUN_FILES = ("checkpoint.pt", RESULTS_NAME, MODEL_NAME, "pet.pt", "prompt_learner.pt", "metrics.csv",
             "training.png")
RUN_DIRS = (TENSORBOARD_DIR,)  # --report-to's logs: a new run's steps must not mix with an earlier run's
_CHUNK = 1 << 20


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(pretrained: str | None) -> str | None:
    """A local weights file by its content (``sha256:...``), an open_clip weight name as it is,
    None for random weights."""
    if pretrained and os.path.isfile(pretrained):
        return f"sha256:{file_sha256(pretrained)}"
    return pretrained or None


def items_digest(items, classnames=()) -> str:
    """The digest of a list of items (absolute path, label, class name) and class names, in order."""
    digest = hashlib.sha256("\n".join(classnames).encode())
    for it in items:
        digest.update(f"{os.path.abspath(it.path)}\t{it.label}\t{it.classname}\n".encode())
    return digest.hexdigest()[:16]


def config_identity(section: str, config) -> dict:
    """``{"<section>.<field>": value}`` for the identity fields of dataclass ``config``
    (``options.identity_values``: one setting's two spellings recorded one way)."""
    return {f"{section}.{name}": value for name, value in identity_values(config).items()}


def run_identity(*, model: str, pretrained: str | None, model_seed, tokenizer: str | None, data_root, dataset: str,
                 base_to_new: bool, train_items, test_groups: dict, skip, train, policy, autocast_dtype,
                 world_size: int) -> dict:
    """The identity of a run, as JSON values (what results.json and checkpoint.pt store)."""
    identity = {
        "model": model, "pretrained": weights_identity(pretrained), "model_seed": model_seed,
        "tokenizer": tokenizer, "data": str(Path(data_root).expanduser().resolve()), "dataset": dataset,
        "classes": "base-to-new" if base_to_new else "all", "train_items": items_digest(train_items),
        "test_items": {name: items_digest(items, names) for name, (items, names) in test_groups.items()},
        **config_identity("skip_config", skip), **config_identity("train_config", train),
        **config_identity("kernel_policy", policy),
        "autocast": None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        "world_size": world_size,
    }
    return json.loads(json.dumps(identity))  # as it reads back from results.json


def _differences(stored: dict, identity: dict) -> list[str]:
    keys = list(identity) + [k for k in stored if k not in identity]
    return [f"{key}: {stored.get(key)!r} there, {identity.get(key)!r} now" for key in keys
            if stored.get(key) != identity.get(key)]


def _recorded(out_dir: Path) -> list[tuple[Path, dict | None, dict]]:
    """(file, its identity or None, results) for results.json and checkpoint.pt, where present."""
    found = []
    results_path = out_dir / RESULTS_NAME
    if results_path.is_file():
        try:
            results = json.loads(results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise checkpoint.CheckpointError(f"cannot read {results_path}: {err}") from err
        if not isinstance(results, dict):
            raise checkpoint.CheckpointError(f"{results_path} is not a skipkernels results file")
        found.append((results_path, results.get("identity"), results))
    checkpoint_path = out_dir / "checkpoint.pt"
    if checkpoint_path.is_file():
        state = checkpoint.load(checkpoint_path, mmap=True)  # only the record is read, not the tensors
        if not isinstance(state, dict) or "signature" not in state:
            raise checkpoint.CheckpointError(f"{checkpoint_path} is not a skipkernels training checkpoint")
        found.append((checkpoint_path, state.get("identity"), {}))
    return found


def check(out_dir: Path, identity: dict) -> dict | None:
    """Before any work on a run into ``out_dir`` that resumes: the finished run's results when the
    folder already holds this run, finished (nothing is to be done); None when there is nothing
    yet or the run goes on from its checkpoint. Another run's folder raises CheckpointError naming
    each setting that differs, the folder's value and this run's."""
    finished = None
    for path, stored, results in _recorded(out_dir):
        if stored is None:
            raise checkpoint.CheckpointError(
                f"{path} does not record the settings it was made with (an older version): use another --out, "
                "or --no-resume to start over")
        diffs = _differences(stored, identity)
        if diffs:
            raise checkpoint.CheckpointError(
                f"{out_dir} holds a run with other settings; use another --out, or --no-resume to start over "
                f"(it replaces that run). Differences: " + "; ".join(diffs))
        if results.get("finished") and (out_dir / MODEL_NAME).is_file():
            finished = results
    return finished


def clear(out_dir: Path) -> list[str]:
    """A fresh start in ``out_dir``: remove what an earlier run wrote there; returns the names."""
    removed = []
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    for name in RUN_DIRS:
        if (out_dir / name).is_dir():
            shutil.rmtree(out_dir / name)
            removed.append(f"{name}/")
    return removed


def results_of(path) -> dict | None:
    """The results.json of the run that ``path`` (its folder, or the folder's model.pt) belongs to."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent if path.name == MODEL_NAME else None
    if folder is None or not (folder / RESULTS_NAME).is_file():
        return None
    try:
        return json.loads((folder / RESULTS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise checkpoint.CheckpointError(f"cannot read {folder / RESULTS_NAME}: {err}") from err

