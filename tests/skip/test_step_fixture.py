"""The results of one training step in every mode and family, recorded as a fixture, so that a
change of how a step is routed (plans, op types, dispatch) cannot change what it computes.

tests/fixtures/step_results.json holds, per (family, mode), the loss, the selected class subset
and, per parameter with a gradient, the gradient's sum and L2 norm, from the ``torch`` backend
at fixed seeds. The comparison allows fp32 summation-order noise only (another machine's BLAS),
far below what any change of the computation would move. Regenerate (on purpose, after a change
that is meant to alter results) with: SKIPKERNELS_WRITE_STEP_FIXTURE=1 pytest tests/skip/test_step_fixture.py
"""
import json
import os
from pathlib import Path

import pytest
import torch

import skipkernels
from skipkernels import SkipConfig, SkipTuner
from skipkernels.models import create_model
from skipkernels.skip.modes import MODES

FIXTURE = Path(__file__).parents[1] / "fixtures" / "step_results.json"
WRITE = os.environ.get("SKIPKERNELS_WRITE_STEP_FIXTURE") == "1"
FAMILIES = {"clip": "skipkernels-tiny", "siglip": "skipkernels-tiny-siglip", "siglip2": "skipkernels-tiny-siglip2",
            "eva02": "skipkernels-tiny-eva02"}
CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "purple hexagon", "orange moon"]
CASES = [(family, mode) for family in FAMILIES for mode in MODES]


def step(family: str, mode: str) -> dict:
    """The step's results, or {"refused": message} where the mode does not apply to the family."""
    try:
        return _step(family, mode)
    except ValueError as err:
        return {"refused": str(err)}


def _step(family: str, mode: str) -> dict:
    model, tokenizer = create_model(FAMILIES[family], pretrained="none", seed=0,
                                    tokenizer="ViT-B-16" if family != "clip" else None)
    model = skipkernels.patch_clip(model, policy="torch")
    torch.manual_seed(1)
    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode=mode, top_ratio=0.5, max_top=3), seed=3)
    size = model.visual.image_size if hasattr(model.visual, "image_size") else 32
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 2, 4, 5])
    inputs = tuner.image_prefix(images) if tuner.config.plan.caches_prefix else images  # LSkip: the frozen prefix
    loss = tuner.loss(inputs, labels)
    loss.backward()
    grads = {name: p.grad.double() for name, p in tuner.named_parameters() if p.grad is not None}
    selected = tuner.last_selected
    return {"loss": loss.item(), "selected": None if selected is None else selected.tolist(),
            "grads": {name: [g.sum().item(), g.norm().item(), g.numel()] for name, g in sorted(grads.items())}}


@pytest.fixture(scope="module")
def recorded():
    if WRITE:
        results = {f"{f}/{m}": step(f, m) for f, m in CASES}
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(results, indent=0, sort_keys=True) + "\n")
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("family,mode", CASES)
def test_step_matches_the_recorded_results(family, mode, recorded):
    expected = recorded[f"{family}/{mode}"]
    got = step(family, mode)
    if "refused" in expected or "refused" in got:
        assert got == expected
        return
    assert got["selected"] == expected["selected"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
    assert got["grads"].keys() == expected["grads"].keys(), "another set of parameters got gradients"
    for name, (total, norm, numel) in expected["grads"].items():
        g_total, g_norm, g_numel = got["grads"][name]
        assert g_numel == numel, name
        # Summation-order noise is ~1e-7 of the norm per element; a change of the step is not.
        assert g_norm == pytest.approx(norm, rel=1e-4, abs=1e-9), name
        assert abs(g_total - total) <= 1e-4 * norm * numel ** 0.5 + 1e-9, name
