"""KernelPolicy: one object says which kernels run; given to patch_clip, SkipTuner and the trainer."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_clip
from skipkernels import KernelPolicy, SkipTuner, patch_clip, use_backend, use_policy
from skipkernels.ops import _dispatch, measured
from skipkernels.ops.linear import linear_act
from skipkernels.ops.policy import ALL_TRITON, current_policy, deterministic_algorithms, resolve

CLASSES = ["red circle", "green square", "blue triangle", "yellow star"]


def test_policy_validates_and_resolves():
    with pytest.raises(ValueError, match="unknown backend"):
        KernelPolicy("gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve("gpu")
    assert KernelPolicy(table=os.path.join("a", "b.json")).table == os.path.join("a", "b.json")
    assert resolve("torch") is resolve("torch") and resolve("torch").backend == "torch"  # built once
    policy = KernelPolicy("triton", table="t.json")
    assert resolve(policy) is policy
    assert resolve(None) is current_policy() == KernelPolicy()


def test_ambient_policy_is_scoped():
    table_policy = KernelPolicy("auto", table="wins.json")
    with use_policy(table_policy):
        assert current_policy() is table_policy
        with use_backend("torch"):  # only the backend changes
            assert current_policy() == KernelPolicy("torch", table="wins.json")
        assert current_policy() is table_policy
    assert current_policy() == KernelPolicy()


def test_the_environment_does_not_choose_the_backend(tmp_path):
    env = {**os.environ, "SKIPKERNELS_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", "from skipkernels.ops.policy import current_policy; print(current_policy().backend)"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "auto"


@pytest.fixture
def seen_policies(monkeypatch):
    """Every policy a Triton-backed op dispatches under (a spy: the real dispatch still runs)."""
    seen = []
    real = _dispatch.dispatch

    def spy(kernel, backend, *args, **kwargs):
        seen.append(resolve(backend))
        return real(kernel, backend, *args, **kwargs)
    monkeypatch.setattr(_dispatch, "dispatch", spy)
    return seen


def test_an_explicit_policy_wins_over_the_ambient_one(seen_policies):
    x, w, b = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16)
    explicit = KernelPolicy("torch", table="other.json")
    with use_backend("triton"):
        linear_act(x, w, b, "gelu", backend=explicit)
        linear_act(x, w, b, "gelu", backend="torch")
        linear_act(x, w, b, "gelu")
    assert seen_policies[0] is explicit and seen_policies[1] == KernelPolicy("torch")
    assert seen_policies[2].backend == "triton"


def test_patch_clip_and_skip_tuner_carry_their_policy_to_every_op(seen_policies, tokenizer):
    patched_policy = KernelPolicy("torch", table="patched.json")
    model = patch_clip(tiny_clip(), policy=patched_policy)
    images = torch.randn(2, 3, 32, 32)
    with use_backend("triton"), torch.no_grad():
        model.encode_image(images)
        model.encode_text(tokenizer(["a cat"]))
    assert seen_policies and all(p is patched_policy for p in seen_policies)

    tuner = SkipTuner(model, CLASSES, tokenizer, mode="skip", skip_layers=1)
    assert tuner.policy is patched_policy  # the model's policy is the tuner's default
    tuner_policy = KernelPolicy("torch", table="tuner.json")
    tuner = SkipTuner(model, CLASSES, tokenizer, mode="skip", skip_layers=1, policy=tuner_policy)
    seen_policies.clear()
    with use_backend("triton"):
        tuner.loss(tuner.image_prefix(images), torch.tensor([0, 2])).backward()
    assert seen_policies and all(p is tuner_policy for p in seen_policies)


def test_compiled_ops_follow_the_policy():
    from skipkernels import _ext
    assert not _dispatch.use_compiled("class_select", KernelPolicy("torch"), "cpu")
    assert not _dispatch.use_compiled("class_select", KernelPolicy("triton"), "cpu")
    assert _dispatch.use_compiled("class_select", KernelPolicy("auto"), "cpu") == _ext.has_kernel("class_select", "cpu")
    with pytest.raises(ValueError, match="does not run on cpu"):
        _dispatch.use_compiled("class_select", KernelPolicy("cuda"), "cpu")


def test_a_policy_table_is_read_from_its_own_path(monkeypatch, tmp_path):
    import types
    table = tmp_path / "mine.json"
    table.write_text(json.dumps({"entries": [
        {"device": "G", "op": "linear_act", "pass": "fwd", "dtype": "torch.float32",
         "dims": [8, 32, "gelu"], "rows": 6, "speedup": 2.0}]}))
    monkeypatch.setattr(measured, "TABLE", tmp_path / "absent.json")
    monkeypatch.setattr(measured, "_device_name", lambda index: "G")
    monkeypatch.setattr(measured, "_decisions", {})
    x = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0, type="cuda"))
    ask = dict(dtype="torch.float32")
    assert measured.prefers_triton("linear_act", x, (8, 32, "gelu"), 6, table=str(table), **ask)
    assert not measured.prefers_triton("linear_act", x, (8, 32, "gelu"), 6, table=None, **ask)
    assert measured.prefers_triton("linear_act", x, (8, 32, "none"), 6, table=ALL_TRITON, **ask)


def test_deterministic_algorithms_are_scoped():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic_algorithms(False):
        assert torch.are_deterministic_algorithms_enabled() == before


def test_the_trainer_is_deterministic_while_it_trains_only(synthetic_root, tokenizer):
    from skipkernels.data.coop import load_splits
    from skipkernels.train.trainer import TrainConfig, Trainer
    splits = load_splits(synthetic_root, "synthetic", 4, 1)
    items = [it for it in splits.train if it.label < len(CLASSES)][:8]
    tuner = SkipTuner(tiny_clip(), splits.classnames[:len(CLASSES)], tokenizer, mode="skip", skip_layers=1)
    config = TrainConfig(epochs=1, batch_size=4, shots=4, same_class_batches=False, warmup_epochs=0,
                         progress=False, deterministic=True)  # the one place the setting lives
    trainer = Trainer(tuner, items, config)
    during = []
    loss = tuner.loss
    tuner.loss = lambda *a, **k: during.append(torch.are_deterministic_algorithms_enabled()) or loss(*a, **k)
    assert not torch.are_deterministic_algorithms_enabled()  # building the trainer changes nothing
    trainer.train()
    assert during and all(during)
    assert not torch.are_deterministic_algorithms_enabled()


def test_finetune_runs_under_its_policy_and_records_it(synthetic_root, tmp_path, seen_policies):
    from skipkernels.skip.tuner import SkipConfig
    from skipkernels.train.trainer import TrainConfig, finetune
    policy = KernelPolicy("torch", table="run.json")
    results = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=1),
                       train=TrainConfig(epochs=1, batch_size=8, shots=2, same_class_batches=False, warmup_epochs=0,
                                         progress=False), out_dir=tmp_path, policy=policy)
    assert results["kernel_policy"] == {"backend": "torch", "table": "run.json"}
    assert seen_policies and all(p is policy for p in seen_policies)
