"""A steady-state Skip Tuning step re-derives nothing: its Python glue is counted with cProfile
(deterministic call counts), so it cannot creep back. The setting is bench/step_overhead.py's:
ViT-B-16 with random weights, omega 6, 100 classes, batch 4, on the CPU."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "step_overhead.py"


@pytest.fixture(scope="module")
def step_overhead():
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The issue's bound for Skip Tuning; a VL-PET step also runs its modules' own forwards (adapter and
# gate: about 13 calls per sub-layer, 24 sub-layers), which the plan does not change.
@pytest.mark.parametrize("mode, most_calls", [("skip", 450), ("lskip-vlpet-large", 650)])
def test_a_steady_step_decides_nothing_again(step_overhead, mode, most_calls):
    tuner, tokens, labels = step_overhead.build("ViT-B-16", classes=100, batch=4, omega=6, mode=mode)
    for _ in range(2):
        step_overhead.one_step(tuner, tokens, labels)
    counts = step_overhead.counts(tuner, tokens, labels)
    assert counts["model_towers"] == 0 and counts["block_parts"] == 0 and counts["block_hooks"] == 0, counts
    assert counts["resolve"] == 0 and counts["bind"] == 0 and counts["prefers_triton"] == 0, counts
    assert counts["python_calls_in_skipkernels"] <= most_calls, counts


def test_the_count_sees_the_glue(step_overhead, monkeypatch):
    """The counter is live: a step that resolved its policy per op again would be caught."""
    from skipkernels.ops import policy
    tuner, tokens, labels = step_overhead.build("skipkernels-tiny", classes=10, batch=1, omega=1)
    step_overhead.one_step(tuner, tokens, labels)
    real = tuner.towers.image.plans[-1].forward

    def resolving_forward(*args, **kwargs):
        policy.resolve(None)
        return real(*args, **kwargs)
    monkeypatch.setattr(tuner.towers.image.plans[-1], "forward", resolving_forward)
    assert step_overhead.counts(tuner, tokens, labels)["resolve"] == 1
