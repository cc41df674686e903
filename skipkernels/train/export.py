"""model.pt: a run's tuned model, complete on its own.

- Where every tuned weight is one of open_clip's (skip, lskip, cskip, ft, and LoRA, folded into
  the weights it adapts), model.pt is a plain open_clip state_dict:
  ``open_clip.create_model(name, pretrained="model.pt")`` loads it.
- Where a mode tunes parts that open_clip's model has no place for (VL-PET and Adapter modules,
  CoOp's context), model.pt is one dict: ``{FORMAT_KEY: FORMAT_VERSION, "model", "tokenizer",
  "skip_config", "classnames", "weights" (the open_clip state_dict), "pet", "prompt_learner"}``.
  ``skipkernels eval`` / ``predict --checkpoint`` and ``prediction.load_classifier`` rebuild the tuner
  from it. open_clip refuses it (it is no state_dict), so those parts are never dropped unnoticed.
"""
from __future__ import annotations

import dataclasses

from skipkernels.models import FORMAT_KEY, FORMAT_VERSION
from skipkernels.models import read_tuned  # noqa: F401 - model.pt's reader, beside its writer
from skipkernels.train import checkpoint


def fold_lora(tuner) -> None:
    """Fold a LoRA tuner's factors into the weights they adapt (model.pt then is a plain open_clip
    state_dict); the run evaluates the folded model, so its accuracy is model.pt's."""
    if tuner.pet is not None and tuner.pet.config.method == "lora" and tuner.pet.active:
        tuner.pet.merge()


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def export_model(tuner, path, model_name: str, tokenizer: str | None, classnames) -> None:
    """Write ``tuner``'s model to ``path`` (LoRA folded first) in the form described above."""
    fold_lora(tuner)
    pet = tuner.pet if tuner.pet is not None and tuner.pet.active else None
    weights = _cpu(pet.base_state_dict() if pet is not None else tuner.model.state_dict())
    if pet is None and tuner.prompt_learner is None:
        checkpoint.atomic_save(weights, path)
        return
    checkpoint.atomic_save({
        FORMAT_KEY: FORMAT_VERSION, "model": model_name, "tokenizer": tokenizer,
        "skip_config": dataclasses.asdict(tuner.config), "classnames": list(classnames), "weights": weights,
        "pet": _cpu(pet.pet_state_dict()) if pet is not None else None,
        "prompt_learner": _cpu(tuner.prompt_learner.state_dict()) if tuner.prompt_learner is not None else None,
    }, path)
