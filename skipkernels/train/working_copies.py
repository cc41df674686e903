"""Low-precision working copies of the GEMM weights a training step reads, kept by the step.

Under autocast every step casts every fp32 weight its blocks multiply by, although a frozen weight
never changes and a trained weight changes only in the optimizer's update. With working copies
(``WorkingCopies``) the step keeps one copy per weight in the autocast dtype:

- a frozen weight (a PET mode's base weights, CoOp's text tower) is cast once an epoch, not once
  a step;
- a trained weight's copy is written by its update: right after the update of that tensor inside
  backward (``BackwardUpdate``), or after ``optimizer.step()``;
- the fp32 masters stay the source of truth: checkpoints, evaluation and export read them, and a
  copy is written again whenever its master changed in place by any other hand (its version
  counter moved) before the next forward uses it.

The maths are autocast's exactly: the copy holds the bits autocast's cast would produce (the same
round-to-nearest conversion), the forward multiplies by it as it would by the cast, and a trained
master receives its gradient through the cast's own backward (``ops.working_copies``). Training with
and without copies is bit-identical (tests/train/test_working_copies.py).

Which weights: the GEMM weights and biases of the blocks the step runs whose backward runs (from
the first block with a trained parameter, or from the first one where the tower's input is trained,
CoOp's text). Autocast holds the casts of exactly those for the backward, so the copies leave the
step's peak where it was; a block that runs without a backward (CoOp's image tower) keeps
autocast's transient casts, which hold no memory across the step. The copies live from an epoch's
first step to its end, so the caching pass and evaluation do not hold them.
"""
from __future__ import annotations

import torch


def _backward_plans(tower, start: int, input_trains: bool) -> list:
    """The block plans of ``tower``'s blocks [start, L) whose backward runs: from the first block
    with a parameter that requires grad, or from ``start`` where the tower's input trains."""
    first = start if input_trains else next(
        (i for i in range(start, len(tower.blocks)) if any(p.requires_grad for p in tower.blocks[i].parameters())),
        len(tower.blocks))
    return [plan for plan in tower.plans[first:] if plan is not None and plan.hooks is not None]


class WorkingCopies:
    """The working copies of a tuner's step (see the module docstring).

    ``attach()`` before the step's forward (writes stale copies and hands them to the block
    plans), ``detach()`` after it, ``updated(param)`` after the update of one trained tensor,
    ``updated_all()`` after ``optimizer.step()``, ``release()`` at an epoch's end."""

    def __init__(self, tuner, dtype):
        self.tuner, self.dtype = tuner, dtype
        self.copies: dict[int, torch.Tensor] = {}   # id(master) -> copy
        self.masters: dict[int, torch.Tensor] = {}  # id(master) -> master
        self.versions: dict[int, int] = {}          # id(master) -> master's version when copied
        self.working: dict[int, tuple] = {}         # id(block plan) -> (plan, what it is handed)
        self.casts = 0                              # copies written (tests and the benchmark count them)
        self._plans_of = (None, None, [])            # (image plans, text plans, the backward-running ones)

    def _plans(self) -> list:
        """The backward-running block plans, found again only when the towers' plans were rebuilt
        (``TowerPlan.plan_blocks`` makes new lists: PET modules, a policy change)."""
        towers = self.tuner.towers
        image, text, plans = self._plans_of
        if image is not towers.image.plans or text is not towers.text.plans:
            tuner = self.tuner
            start = tuner.skip_layers if tuner.plan.caches_prefix else 0
            prompt = tuner.plan.trains == "prompt"
            plans = _backward_plans(towers.image, start, False) * (not prompt) + \
                _backward_plans(towers.text, start, prompt)
            self._plans_of = (towers.image.plans, towers.text.plans, plans)
        return plans

    def _copy_of(self, master):
        key = id(master)
        copy = self.copies.get(key)
        if copy is None:
            copy = self.copies[key] = torch.empty_like(master, dtype=self.dtype, memory_format=torch.preserve_format)
            self.masters[key] = master
            self.versions[key] = -1
        return copy

    def _write(self, key: int) -> None:
        master = self.masters[key]
        with torch.no_grad():
            self.copies[key].copy_(master)  # the conversion autocast's cast makes
        self.versions[key] = master._version
        self.casts += 1

    def attach(self) -> None:
        """Hand every backward-running block plan its copies, each written again where its master
        changed since (or never written). A plan's copies are found once: a parameter replaced
        since is not the one ``read_through`` sees, which then keeps autocast's cast."""
        for plan in self._plans():
            entry = self.working.get(id(plan))  # the entry holds the plan, so its id is not reused
            if entry is None:
                sources = plan.gemm_parameters()  # read without computing: a parametrised weight has none
                # a copy only where the forward reads the parameter itself (not W + BA computed from it)
                read = plan.gemm_weights()
                copies = tuple(None if t is None or t is not r or not t.is_floating_point() else self._copy_of(t)
                               for t, r in zip(sources, read))
                entry = self.working[id(plan)] = (plan, (sources, copies))
            plan.working = entry[1]
        self.updated_all()

    def detach(self) -> None:
        for plan, _ in self.working.values():
            plan.working = None

    def updated(self, param) -> None:
        """``param`` was just updated: its copy now, while it is fresh in cache."""
        if id(param) in self.copies:
            self._write(id(param))

    def updated_all(self) -> None:
        """Every copy whose master changed since it was written, written again."""
        for key, master in self.masters.items():
            if self.versions[key] != master._version:
                self._write(key)

    def release(self) -> None:
        """Free every copy (written again at the next ``attach``)."""
        self.detach()
        self.copies.clear()
        self.masters.clear()
        self.versions.clear()
        self.working.clear()
        self._plans_of = (None, None, [])  # and which blocks run a backward, looked at again

    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.copies.values())
