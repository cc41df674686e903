"""KernelPolicy: one object says which kernels run; given to patch_clip, SkipTuner and the trainer."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_clip
from skipkernels import KernelPolicy, SkipConfig, SkipTuner, patch_clip, use_backend, use_policy
from skipkernels.ops import measured
from skipkernels.ops import op as op_module
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
    """Every policy an op is bound under (a spy: the real binding still runs). Each op's memo of
    bound callables starts empty, so every binding is seen."""
    seen = SeenPolicies()
    real = op_module.Op.bind

    def spy(self, policy):
        seen.append(resolve(policy))
        seen.ops.append(self.name)
        return real(self, policy)
    monkeypatch.setattr(op_module.Op, "bind", spy)
    saved = {op: dict(op._bound) for op in op_module.all_ops().values()}
    for op in saved:
        op._bound.clear()
    yield seen
    for op, bound in saved.items():
        op._bound.clear()
        op._bound.update(bound)


class SeenPolicies(list):
    def __init__(self):
        super().__init__()
        self.ops = []

    def clear(self):
        super().clear()
        self.ops.clear()


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
    with use_backend("triton"):
        model = patch_clip(tiny_clip(), policy=patched_policy)
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            model.encode_image(images)
            model.encode_text(tokenizer(["a cat"]))
    assert seen_policies and all(p is patched_policy for p in seen_policies)

    tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="skip", skip_layers=1))
    assert tuner.policy is patched_policy  # the model's policy is the tuner's default
    tuner_policy = KernelPolicy("torch", table="tuner.json")
    seen_policies.clear()
    with use_backend("triton"):
        tuner = SkipTuner(model, CLASSES, tokenizer, SkipConfig(mode="skip", skip_layers=1), policy=tuner_policy)
        tuner.loss(tuner.image_prefix(images), torch.tensor([0, 2])).backward()
    assert seen_policies and all(p is tuner_policy for p in seen_policies)
    assert {"layer_norm_linear", "attention", "linear_residual", "layer_norm_mlp", "class_select",
            "subset_logits_ce"} <= set(seen_policies.ops)


def test_a_plan_given_no_policy_follows_the_ambient_one(seen_policies, tokenizer):
    tuner = SkipTuner(tiny_clip(), CLASSES, tokenizer, SkipConfig(mode="skip", skip_layers=1))
    inputs, labels = tuner.image_prefix(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])
    tuner.loss(inputs, labels)
    seen_policies.clear()
    tuner.loss(inputs, labels)
    assert not seen_policies  # a steady step binds nothing
    with use_backend("torch"):
        tuner.loss(inputs, labels)
    assert seen_policies and all(p.backend == "torch" for p in seen_policies)


def test_compiled_ops_follow_the_policy():
    from skipkernels import _ext
    from skipkernels.ops.class_select import CLASS_SELECT, class_select_reference
    assert CLASS_SELECT.bind(KernelPolicy("torch")) is class_select_reference
    assert CLASS_SELECT.bind(KernelPolicy("triton")) is class_select_reference  # no Triton kernel: the reference
    auto = CLASS_SELECT.bind(KernelPolicy("auto"))
    assert (auto is class_select_reference) == (not _ext.has_kernel("class_select", "cpu"))
    f, t = torch.randn(2, 4), torch.randn(5, 4)
    args = (f, t, torch.tensor([0, 1]), torch.zeros(3, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="does not run on cpu"):
        CLASS_SELECT.bind(KernelPolicy("cuda"))(*args)


def test_a_policy_table_is_read_from_its_own_path(monkeypatch, tmp_path):
    import types
    table = tmp_path / "mine.json"
    table.write_text(json.dumps({"entries": [
        {"device": "G", "op": "linear_act", "pass": "fwd", "dtype": "torch.float32",
         "dims": [8, 32, "gelu"], "rows": 6, "speedup": 2.0}]}))
    monkeypatch.setattr(measured, "TABLE", tmp_path / "absent.json")
    monkeypatch.setattr(measured, "_device_name", lambda index: "G")
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
    tuner = SkipTuner(tiny_clip(), splits.classnames[:len(CLASSES)], tokenizer, SkipConfig(mode="skip", skip_layers=1))
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
    from skipkernels.train.trainer import TrainConfig
    from skipkernels.train.job import finetune
    policy = KernelPolicy("torch", table="run.json")
    results = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=1),
                       train=TrainConfig(epochs=1, batch_size=8, shots=2, same_class_batches=False, warmup_epochs=0,
                                         progress=False), out_dir=tmp_path, policy=policy)
    assert results["kernel_policy"] == {"backend": "torch", "table": "run.json"}
    assert seen_policies and all(p is policy for p in seen_policies)


def test_a_deep_copied_policy_is_the_same_object():
    """A deep-copied model or tuner keeps following the ambient policy (checked by identity), so
    it does not rebind its ops at its first call, which inside torch.compile would break the graph."""
    import copy

    from skipkernels import KernelPolicy
    policy = KernelPolicy("torch")
    assert copy.deepcopy(policy) is policy
    assert copy.deepcopy({"p": policy})["p"] is policy
