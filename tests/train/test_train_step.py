"""The training step kinds (skipkernels/train/step.py): what auto chooses and why, that a forced
kind which cannot run is refused before training, that the compiled step trains the eager step's
weights within fp32 rounding across a learning-rate change and a resume under another kind, and
that the step loop reads nothing back to the host between read-backs."""
import copy
import types

import pytest
import torch

from conftest import tiny_clip
from skipkernels import KernelPolicy, SkipConfig, SkipTuner, _ext
from skipkernels.data.coop import load_splits
from skipkernels.data.fewshot import sample_few_shot
from skipkernels.train import step as step_module
from skipkernels.train.step import choose_step, graph_memory_unavailable
from skipkernels.train.trainer import TrainConfig, Trainer

FAST = dict(batch_size=2, lr=3e-3, lr_image=3e-3, shots=4, same_class_batches=False, warmup_epochs=1,
            warmup_lr=1e-3, progress=False, amp=None)


def _tuner(names, tokenizer, **kw):
    config = SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5)
    return SkipTuner(tiny_clip(layers=2), names, tokenizer, config, seed=1, **kw)


def _items(synthetic_root):
    splits = load_splits(synthetic_root, "synthetic")
    return splits.classnames, sample_few_shot(splits.train, 4, seed=1)


def _weights(tuner):
    return {n: p.detach().clone() for n, p in tuner.trainable_named_parameters()}


def _fake_cuda_tuner(resample="fixed", top_k=3, enabled=True, skipper=True):
    skip = types.SimpleNamespace(resample=resample, top_k=top_k, enabled=enabled) if skipper else None
    return types.SimpleNamespace(device=torch.device("cuda"), skipper=skip, bound_policy=KernelPolicy("auto"))


def _sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)


CHOICES = [
    # (what the run has, requested, batch, chosen kind or the refusal, words of the reason)
    ("CUDA with its compiled ops", "auto", 2, "graph", "fixed class-subset size"),
    ("CUDA without its compiled ops", "auto", 2, "eager", "it needs the compiled subset_logits_ce and class_select"),
    ("CUDA, CSkip redrawn each step", "auto", 2, "eager", "resample='step'"),
    ("CUDA, batch larger than K", "auto", 4, "eager", "more than K = 3 distinct labels"),
    ("CUDA, batch larger than K, forced graph", "graph", 4, ValueError, "step='graph' cannot run"),
    ("CUDA, CSkip redrawn each step, forced compiled", "compiled", 2, ValueError, "resample='step'"),
    ("CUDA, no CSkip (ft, CoOp, PET)", "auto", 8, "graph", "fixed class-subset size"),
    ("CUDA, forced eager", "eager", 2, "eager", "asked for"),
]


@pytest.mark.parametrize("case, requested, batch, expected, words", CHOICES, ids=[c[0] for c in CHOICES])
def test_auto_chooses_and_says_why(case, requested, batch, expected, words, monkeypatch):
    built = "without" not in case
    monkeypatch.setattr(_ext, "has_kernel", lambda name, device: built)
    monkeypatch.setattr(_ext, "load_error", None if built else "not built")
    tuner = _fake_cuda_tuner(resample="step" if "redrawn" in case else "fixed", skipper="no CSkip" not in case)
    if expected is ValueError:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            choose_step(requested, tuner, _sgd(), batch)
        return
    choice = choose_step(requested, tuner, _sgd(), batch)
    assert choice.kind == expected and words in choice.reason
    assert str(choice) == f"{expected} ({choice.reason})"


def test_auto_weighs_the_graph_steps_gradients_against_the_memory_left(monkeypatch):
    monkeypatch.setattr(_ext, "has_kernel", lambda name, device: True)
    monkeypatch.setattr(_ext, "load_error", None)
    tuner = _fake_cuda_tuner(resample="fixed", skipper=True)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1000))], lr=0.1, momentum=0.9)  # 4000 B
    # the graph holds 2 x 4000 B of gradients and update temporaries: at most half of what is left
    assert choose_step("auto", tuner, optimizer, 2, memory_left=16000).kind == "graph"
    tight = choose_step("auto", tuner, optimizer, 2, memory_left=15999)
    assert tight.kind == "compiled" and "graph is possible, but the graph step would hold" in tight.reason
    assert choose_step("auto", tuner, optimizer, 2).kind == "graph"  # not weighed: no memory given
    assert choose_step("graph", tuner, optimizer, 2, memory_left=0).kind == "graph"  # asked for: not weighed
    assert graph_memory_unavailable(4000, 16000) is None
    assert "0.0 GiB left" in graph_memory_unavailable(4000, -5)


def test_on_cpu_auto_is_eager_and_graph_is_refused_before_training(synthetic_root, tokenizer, tmp_path):
    names, items = _items(synthetic_root)
    tuner = _tuner(names, tokenizer)
    trainer = Trainer(tuner, items, TrainConfig(epochs=1, **FAST))
    assert trainer.step_choice.kind == "eager" and "on CPU" in trainer.step_choice.reason
    with pytest.raises(ValueError, match="step='graph' cannot run this training: graph capture needs a CUDA device"):
        Trainer(tuner, items, TrainConfig(epochs=1, step="graph", **FAST))
    with pytest.raises(ValueError, match="step must be one of"):
        TrainConfig(step="fast")
    reference = SkipTuner(tiny_clip(layers=2), names, tokenizer, SkipConfig(mode="skip", skip_layers=1), policy="torch")
    with pytest.raises(ValueError, match="step='compiled' cannot run this training: the step has no static form: "
                                         "it needs the compiled .* ops, which kernel backend 'torch' does not run"):
        Trainer(reference, items, TrainConfig(epochs=1, step="compiled", **FAST))


@pytest.fixture
def fast_compile(monkeypatch):
    """The compiled step's tracing and autograd without inductor's code generation (minutes on
    this machine's two cores); test_compiled_step_with_inductor runs the real backend once."""
    compile_ = torch.compile
    monkeypatch.setattr(step_module.torch, "compile",
                        lambda fn, **kw: compile_(fn, **{**kw, "backend": "aot_eager"}))


def _train(tuner, items, out_dir=None, **config):
    trainer = Trainer(tuner, items, TrainConfig(**{**FAST, **config}), out_dir)
    trainer.resume()
    trainer.train()
    return trainer


# The compiled (static) step and eager differ by summation order only: the static step truncates
# text to the longest prompt of all classes, and the compiled graph fuses differently.
RTOL, ATOL = 1e-4, 1e-6


def _assert_close(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=ATOL, msg=name)


def test_compiled_trains_the_eager_weights_across_an_lr_change_and_a_resume(synthetic_root, tokenizer, tmp_path,
                                                                            fast_compile):
    names, items = _items(synthetic_root)
    base = _tuner(names, tokenizer)
    eager, compiled, switched = (copy.deepcopy(base) for _ in range(3))
    runs = {"eager": _train(eager, items, tmp_path / "eager", epochs=2, step="eager"),
            "compiled": _train(compiled, items, tmp_path / "compiled", epochs=2, step="compiled")}
    assert runs["compiled"].step_choice.kind == "compiled"
    lrs = [s["lr"] for s in runs["eager"].steps]
    assert lrs[0] == 1e-3 and lrs[-1] == 3e-3  # the warm-up epoch, then the base rate
    _assert_close(_weights(eager), _weights(compiled))
    for a, b in zip(runs["eager"].steps, runs["compiled"].steps):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # A run that stopped after epoch 1 under eager resumes under compiled: the kind is not part of
    # the run's identity, and it ends where the uninterrupted eager run does.
    _train(switched, items, tmp_path / "switched", epochs=2, step="eager", stop_after_epochs=1)
    resumed = _train(copy.deepcopy(base), items, tmp_path / "switched", epochs=2, step="compiled")
    assert resumed.start_epoch == 1 and len(resumed.history) == 2
    _assert_close(_weights(eager), _weights(resumed.tuner))


def test_a_resume_under_the_same_kind_is_bit_identical(synthetic_root, tokenizer, tmp_path, fast_compile):
    names, items = _items(synthetic_root)
    base = _tuner(names, tokenizer)
    straight = _train(copy.deepcopy(base), items, tmp_path / "straight", epochs=2, step="compiled")
    _train(copy.deepcopy(base), items, tmp_path / "resumed", epochs=2, step="compiled", stop_after_epochs=1)
    resumed = _train(copy.deepcopy(base), items, tmp_path / "resumed", epochs=2, step="compiled")
    a, b = _weights(straight.tuner), _weights(resumed.tuner)
    assert all(torch.equal(a[k], b[k]) for k in a)


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("log_every", [1, 3, 50])
def test_the_static_step_loop_reads_losses_back_only_at_read_backs(synthetic_root, tokenizer, monkeypatch,
                                                                    fast_compile, log_every):
    names, items = _items(synthetic_root)
    trainer = Trainer(_tuner(names, tokenizer), items, TrainConfig(epochs=1, step="compiled", log_every=log_every,
                                                                  **FAST))
    where = [None]  # "step" or "read_back" while those run
    reads = {"step": 0, "read_back": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if where[0] is not None:
                reads[where[0]] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)

    def watch(fn, label):
        def watched(*args, **kwargs):
            where[0] = label
            try:
                return fn(*args, **kwargs)
            finally:
                where[0] = None
        return watched
    step, read_back = trainer.train_step, trainer._read_back
    trainer.train_step = watch(step, "step")
    trainer.train_step.kind, trainer.train_step.epoch_started = step.kind, step.epoch_started
    trainer.train_step.epoch_ended = step.epoch_ended
    trainer._read_back = watch(read_back, "read_back")
    trainer.train()
    steps = len(trainer.steps)
    assert steps >= 4
    assert reads["step"] == 0, "the static step read a value back to the host"
    # one transfer per read-back: every log_every steps, and the rest at the epoch's end
    assert reads["read_back"] == -(-steps // log_every)


def test_a_non_finite_loss_stops_at_the_next_read_back_naming_the_step(synthetic_root, tokenizer, monkeypatch):
    names, items = _items(synthetic_root)
    tuner = _tuner(names, tokenizer)
    trainer = Trainer(tuner, items, TrainConfig(epochs=1, log_every=3, **FAST))
    step = trainer.train_step
    calls = [0]

    def poisoned(inputs, labels, weight=1.0):
        calls[0] += 1
        loss = step(inputs, labels, weight)
        return loss * float("nan") if calls[0] == 2 else loss
    poisoned.kind, poisoned.epoch_started = step.kind, step.epoch_started
    trainer.train_step = poisoned
    from skipkernels.train.trainer import TrainingError
    with pytest.raises(TrainingError, match=r"non-finite loss nan at epoch 1, step 1 \(training items"):
        trainer.train()
    assert calls[0] == 3  # stopped at the first read-back after the bad step, not at the epoch's end


@pytest.mark.slow
def test_compiled_step_with_inductor(synthetic_root, tokenizer):
    """The compiled kind as users run it (inductor), one epoch, against eager."""
    names, items = _items(synthetic_root)
    base = _tuner(names, tokenizer)
    eager, compiled = copy.deepcopy(base), copy.deepcopy(base)
    _train(eager, items, epochs=1, step="eager")
    _train(compiled, items, epochs=1, step="compiled")
    _assert_close(_weights(eager), _weights(compiled))


def test_bench_reports_finetunes_steady_step_beside_the_same_step_object(tmp_path):
    """`skipkernels bench --finetune KINDS`: finetune's own steady step next to the bench's time for
    the mode that runs the same step object and kernels."""
    import json

    from skipkernels.cli import main
    assert main(["bench", "--quick", "--modes", "skip-kernels", "--finetune", "eager", "--no-memory", "--no-epoch",
                 "--repeats", "2", "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("e2e-*.json")).read_text())
    run = report["finetune"]["eager"]
    assert run["step"] == "eager (asked for)" and run["bench_mode"] == "skip-kernels"
    assert run["epoch_steps"] == 12  # 12 classes x 4 shots / batch 4
    assert run["steady_step_ms"] > 0 and run["vs_bench"] == pytest.approx(run["steady_step_ms"] / run["bench_step_ms"])
    assert "finetune --step eager" in report["table"]
    assert main(["bench", "--quick", "--finetune", "fast", "--out", str(tmp_path)]) == 2  # before any work


def test_the_compiled_step_plans_again_outside_its_trace(synthetic_root, tokenizer, fast_compile):
    """PET applied to another model moves the plans' generation; the compiled step must re-plan
    before its traced call (rebuilding a plan reads the measured table's file, which breaks a
    fullgraph trace)."""
    names, items = _items(synthetic_root)
    trainer = Trainer(_tuner(names, tokenizer), items, TrainConfig(epochs=1, step="compiled", **FAST))
    SkipTuner(tiny_clip(layers=2), names, tokenizer, SkipConfig(mode="lora", skip_layers=1))
    trainer.train()
    assert len(trainer.steps) >= 4 and trainer.train_step.kind == "compiled"


@pytest.mark.parametrize("mode", ["coop", "lskip-lora", "lskip-vlpet-large", "ft"])
def test_the_compiled_step_trains_pet_coop_and_ft_modes_as_eager_does(mode, synthetic_root, tokenizer, fast_compile):
    names, items = _items(synthetic_root)

    def tuner():
        return SkipTuner(tiny_clip(layers=2), names, tokenizer, SkipConfig(mode=mode, skip_layers=1), seed=1)
    eager = _train(tuner(), items, epochs=1, step="eager")
    compiled = _train(tuner(), items, epochs=1, step="compiled")
    assert compiled.step_choice.kind == "compiled"
    _assert_close(_weights(eager.tuner), _weights(compiled.tuner))


@pytest.mark.parametrize("drop_ratio", [0.0, 0.5])
def test_the_image_cache_auto_weighs_is_the_one_an_epoch_builds(drop_ratio, synthetic_root, tokenizer):
    """--step auto counts the epoch's LSkip image cache before it exists: the same bytes as the
    cache the first epoch builds, token dropping included."""
    names, items = _items(synthetic_root)
    tuner = SkipTuner(tiny_clip(layers=2), names, tokenizer,
                      SkipConfig(mode="skip", skip_layers=1, top_ratio=0.5, drop_ratio=drop_ratio), seed=1)
    trainer = Trainer(tuner, items, TrainConfig(epochs=1, **FAST))
    predicted = trainer._image_cache_bytes_on_device()
    trainer.train()
    assert predicted == trainer.cache_bytes > 0
