"""CSkip: per-step class subset for the text tower (docs/ARCHITECTURE.md, "The algorithm").

The keep-mask over rank positions K..C-1 is drawn once per run by default (as the paper's code
does), which keeps the subset size K' = K + mask.sum() fixed whenever the batch has at most K
distinct labels, so the compiled selection op needs no host synchronisation.
``resample="step"`` draws a fresh mask every step.

Quirk fixed here: the reference implementation remapped a batch label that had not been selected
to class 0 silently. Labels are forced to the top of the ranking, so they are always selected,
and the remap is a prefix sum over the kept set (a label can't be lost).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skipkernels import distributed
from skipkernels.ops.class_select import CLASS_SELECT, check_cskip_params, check_label_range, draw_rank_mask, top_k_for

RESAMPLE_MODES = ("fixed", "step")


class ClassSkipper:
    """Chooses the classes the text tower runs on each step.

    prototypes: (C, E) normalised zero-shot text features of the pretrained model. policy: the
    KernelPolicy (or backend name) of class_select; None: the ambient one when it is built.
    """

    def __init__(self, prototypes: torch.Tensor, top_ratio: float = 0.5, max_top: int = 50, lam: float = 0.3,
                 resample: str = "fixed", seed: int = 0, policy=None, top_count: int | None = None):
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
        check_cskip_params(top_ratio, max_top, lam, top_count)
        self.prototypes = F.normalize(prototypes.detach().float(), dim=-1)
        self.num_classes = prototypes.shape[0]
        self.top_k = top_k_for(self.num_classes, top_ratio, max_top, top_count)
        self.lam = lam
        self.resample = resample
        self.enabled = self.top_k < self.num_classes
        self.generator = torch.Generator().manual_seed(seed)
        self.rank_mask = draw_rank_mask(self.num_classes, self.top_k, lam, self.generator)
        self._device_mask = None
        # K' under the fixed mask: static whenever a batch has at most K labels (B <= K).
        self.fixed_size = self.top_k + int(self.rank_mask.sum())
        self.last_selected: torch.Tensor | None = None
        self.last_labels: torch.Tensor | None = None
        self.bind(policy)

    def summary(self) -> dict:
        """How many classes a step runs (results.json's ``class_subset``)."""
        return {"classes": self.num_classes, "top_k": self.top_k, "enabled": self.enabled,
                "resample": self.resample,
                "subset_size": self.fixed_size if self.resample == "fixed" else None}

    def describe(self) -> str:
        """One line for ``print(tuner)`` and a run's start."""
        if not self.enabled:
            return f"CSkip: off, every one of the {self.num_classes} classes runs (K = C)"
        tail = self.num_classes - self.top_k
        kept = (f"+ {int(self.rank_mask.sum())} of the {tail} lower ranks by the run's rank mask: "
                f"K' = {self.fixed_size} classes a step (more when a batch has over K distinct labels)"
                if self.resample == "fixed" else f"+ lower ranks of {tail} by a mask drawn each step")
        return f"CSkip: the top K = {self.top_k} of C = {self.num_classes} classes {kept}"

    def bind(self, policy) -> None:
        """Run class_select under ``policy`` (a KernelPolicy, a backend name, or None: the ambient one now)."""
        self.class_select = CLASS_SELECT.bind(policy)

    def to(self, device):
        self.prototypes = self.prototypes.to(device)
        self._device_mask = None
        return self

    def _mask_on(self, device):
        if self.resample == "step":
            self.rank_mask = draw_rank_mask(self.num_classes, self.top_k, self.lam, self.generator)
            return self.rank_mask.to(device)
        if self._device_mask is None or self._device_mask.device != torch.device(device):
            self._device_mask = self.rank_mask.to(device)
        return self._device_mask

    @torch.no_grad()
    def select(self, image_features: torch.Tensor, labels: torch.Tensor, check: bool = True):
        """image_features (B, E) of the current model (gradients are not needed); labels (B,).
        Returns (selected class indices ascending, labels remapped into them). ``check=False``
        skips the host-side label range check (the caller checked them). class_select runs under
        the policy given to ``bind``."""
        if check:
            check_label_range(labels, self.num_classes)
        if not self.enabled:
            selected = torch.arange(self.num_classes, device=labels.device)
            remapped = labels.long()
        else:
            feats = F.normalize(image_features.detach().float(), dim=-1)
            # Under torch.distributed the subset is chosen over the global batch, identically on
            # every rank (same features, labels and rank mask), then each rank keeps its labels.
            feats, all_labels, offset = distributed.gather_batch(feats, labels.long())
            mask = self._mask_on(feats.device)
            static = self.resample == "fixed" and all_labels.shape[0] <= self.top_k and not distributed.enabled()
            selected, remapped = self.class_select(feats, self.prototypes.to(feats.device), all_labels, mask,
                                                   self.top_k, self.fixed_size if static else -1)
            remapped = remapped[offset:offset + labels.shape[0]]
        self.last_selected, self.last_labels = selected, remapped
        return selected, remapped

    def state_dict(self) -> dict:
        return {"rank_mask": self.rank_mask.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rank_mask = state["rank_mask"].clone()
        self.generator.set_state(state["generator"])
        self.fixed_size = self.top_k + int(self.rank_mask.sum())
        self._device_mask = None
