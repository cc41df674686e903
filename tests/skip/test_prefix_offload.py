"""Frozen prefix weights off the device between LSkip caching passes (SkipTuner.offload_prefix).

On a CPU device offloading is off (the host is the device); these tests force it on, the host copy
then being a second CPU tensor, so the data path runs as on a GPU: the device-side storages are
freed after the caching pass and filled again, bit for bit, for the next one and for every reader.
"""
import copy
import json

import pytest
import torch

from skipkernels.skip.tuner import SkipConfig, SkipTuner
from skipkernels.train.job import finetune
from skipkernels.train.trainer import TrainConfig

from conftest import tiny_clip

FAST = dict(batch_size=8, lr=3e-3, lr_image=3e-3, shots=8, same_class_batches=False, warmup_epochs=0,
            progress=False)
CLASSES = ["cat", "dog", "car", "tree"]


def _forced(monkeypatch):
    """Every tuner built from here on offloads as on a GPU; returns the tuners built."""
    built = []
    set_up = SkipTuner._set_up_prefix_offload

    def forced(self, force=False):
        set_up(self, force=True)
        built.append(self)

    monkeypatch.setattr(SkipTuner, "_set_up_prefix_offload", forced)
    return built


def _tuner(tokenizer, mode="skip", **config):
    return SkipTuner(tiny_clip(), CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=2, **config))


def _prefix_names(tuner):
    offloaded = {s.data_ptr() for part in tuner.prefix_offload.values() for s in part.storages}
    return {n for n, t in [*tuner.model.named_parameters(), *tuner.model.named_buffers()]
            if t.untyped_storage().data_ptr() in offloaded}


def test_offloading_is_off_on_cpu_and_says_why(tokenizer):
    assert _tuner(tokenizer).prefix_offload_state == "off (on cpu the host is the device)"
    assert _tuner(tokenizer, offload_prefix=False).prefix_offload_state == "off (turned off in the config)"
    assert SkipTuner(tiny_clip(), CLASSES, tokenizer, SkipConfig(mode="ft")).prefix_offload_state == \
        "off (nothing is cached in mode ft)"
    tuner = _tuner(tokenizer)
    assert "prefix weights off the device between caching passes: off (on cpu" in repr(tuner)
    tuner.offload_prefix()  # off: nothing moves
    assert not tuner.prefix_offloaded and tuner.prefix_offload == {}


def test_the_prefix_is_blocks_below_omega_and_the_stems(tokenizer):
    tuner = _tuner(tokenizer)
    tuner._set_up_prefix_offload(force=True)
    names = _prefix_names(tuner)
    expected = {n for n, _ in tuner.model.named_parameters()
                if any(n.startswith(f"{tower}.resblocks.{i}.") for tower in ("visual.transformer", "transformer")
                       for i in range(2))}
    expected |= {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                 "visual.ln_pre.weight", "visual.ln_pre.bias", "token_embedding.weight", "positional_embedding"}
    assert names == expected
    assert tuner.prefix_offload_state.startswith("on (") and "host copy" in tuner.prefix_offload_state
    nbytes = sum(p.numel() * p.element_size() for n, p in tuner.model.named_parameters() if n in expected)
    assert sum(part.nbytes for part in tuner.prefix_offload.values()) == nbytes


def test_offload_frees_the_storage_and_restore_brings_the_same_bits(tokenizer):
    tuner = _tuner(tokenizer)
    tuner._set_up_prefix_offload(force=True)
    before = {n: t.detach().clone() for n, t in tuner.model.state_dict(keep_vars=True).items()}
    names = _prefix_names(tuner)
    params = dict(tuner.model.named_parameters())
    tuner.offload_prefix()
    assert tuner.prefix_offloaded
    for name, p in params.items():
        if name in names:
            assert p.untyped_storage().nbytes() == 0, name
            assert p.device == tuner.device and p.shape == before[name].shape  # the same tensor, emptied
        else:
            assert torch.equal(p, before[name]), name  # what the steps read stays
    host = torch.cat([copy for part in tuner.prefix_offload.values() for copy in part.host])
    assert host.numel() == sum(part.nbytes for part in tuner.prefix_offload.values())
    # the steps run from the caches without the prefix
    tokens = torch.randn(2, 17, 64)
    tuner.loss(tokens, torch.tensor([0, 1])).backward()
    tuner.restore_prefix()
    assert not tuner.prefix_offloaded
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name].detach()), name


def test_readers_of_the_weights_get_them_back(tokenizer):
    tuner = _tuner(tokenizer)
    tuner._set_up_prefix_offload(force=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = tuner.encode_images(images)
        text = tuner.encode_classes(CLASSES)
    state = {n: t.clone() for n, t in tuner.model.state_dict().items()}
    tuner.model.register_state_dict_pre_hook(lambda *_: None)  # another hook after the tuner's

    tuner.offload_prefix()
    assert {n: t for n, t in tuner.model.state_dict().items()}.keys() == state.keys()
    assert not tuner.prefix_offloaded  # state_dict brought them back first
    assert all(torch.equal(t, state[n]) for n, t in tuner.model.state_dict().items())

    tuner.offload_prefix()
    with tuner.prefix_on_device():
        assert not tuner.prefix_offloaded
        with torch.no_grad():
            assert torch.equal(tuner.encode_images(images), features)
    assert tuner.prefix_offloaded  # off again after the block

    tuner.offload_prefix()
    with torch.no_grad():
        assert torch.equal(tuner.encode_classes(CLASSES), text)  # brings back the text prefix
        assert torch.equal(tuner.encode_images(images), features)
    tuner.offload_prefix()
    tuner.model.load_state_dict(state)  # a load fills real storage
    assert all(torch.equal(t, state[n]) for n, t in tuner.model.state_dict().items())


def test_a_model_with_the_hooks_still_copies_and_pickles(tokenizer, tmp_path):
    tuner = _tuner(tokenizer)
    tuner._set_up_prefix_offload(force=True)
    state = {n: t.clone() for n, t in tuner.model.state_dict().items()}
    copied = copy.deepcopy(tuner.model)
    torch.save(tuner.model, tmp_path / "model.pickle")
    loaded = torch.load(tmp_path / "model.pickle", weights_only=False)
    for model in (copied, loaded):
        assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    tuner.offload_prefix()
    copied.state_dict()  # its hook is inert: the tuner's weights stay off
    assert tuner.prefix_offloaded


def test_with_pet_only_frozen_weights_move(tokenizer):
    tuner = _tuner(tokenizer, mode="lskip-adapter")
    tuner._set_up_prefix_offload(force=True)
    trainable = {n for n, p in tuner.model.named_parameters() if p.requires_grad}
    assert trainable and not trainable & _prefix_names(tuner)
    assert _prefix_names(tuner)


def _run(root, folder, **train):
    return finetune(root, "synthetic", "skipkernels-tiny", skip=SkipConfig(mode="skip", skip_layers=1),
                    train=TrainConfig(**{**FAST, **train}), out_dir=folder)


def test_training_with_offload_equals_training_without(synthetic_root, tmp_path, monkeypatch):
    # two epochs, stopped there (checkpoint), with an evaluation after the first; then resumed
    _run(synthetic_root, tmp_path / "plain", epochs=3, stop_after_epochs=2, eval_every=1)
    plain_state = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)

    built = _forced(monkeypatch)
    freed = []
    loss = SkipTuner.loss

    def observed(self, *args, **kwargs):  # every step runs with the prefix's storage freed
        freed.append(all(s.nbytes() == 0 for part in self.prefix_offload.values() for s in part.storages))
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(SkipTuner, "loss", observed)
    _run(synthetic_root, tmp_path / "offload", epochs=3, stop_after_epochs=2, eval_every=1)
    assert built and built[-1].prefix_offload_state.startswith("on (")
    assert freed and all(freed)
    assert not built[-1].prefix_offloaded  # whole again after training
    state = torch.load(tmp_path / "offload" / "checkpoint.pt", weights_only=False)
    assert state["trainable"].keys() == plain_state["trainable"].keys()
    assert all(torch.equal(state["trainable"][n], plain_state["trainable"][n]) for n in state["trainable"])
    momentum = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    plain_momentum = [s["momentum_buffer"] for s in plain_state["optimizer"]["state"].values()]
    assert len(momentum) == len(plain_momentum) > 0
    assert all(torch.equal(a, b) for a, b in zip(momentum, plain_momentum))
    assert [h["loss"] for h in state["history"]] == [h["loss"] for h in plain_state["history"]]
    assert state["history"][0]["accuracy"] == plain_state["history"][0]["accuracy"]

    done = _run(synthetic_root, tmp_path / "offload", epochs=3, eval_every=1)
    monkeypatch.undo()
    plain = _run(synthetic_root, tmp_path / "plain", epochs=3, eval_every=1)
    assert done["resumed"] and done["finished"] and plain["finished"]
    assert done["prefix_offload"].startswith("on (") and plain["prefix_offload"].startswith("off (")
    assert done["accuracy"] == plain["accuracy"]
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "offload" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the prefix weights included
    saved = json.loads((tmp_path / "offload" / "results.json").read_text())
    assert saved["prefix_offload"] == done["prefix_offload"]


@pytest.mark.parametrize("flag", [[], ["--no-offload-prefix"]])
def test_the_flag_turns_it_off(flag):
    from skipkernels.cli import build_parser
    from skipkernels.options import from_args
    args = build_parser().parse_args(["finetune", "--data", "x", *flag])
    assert from_args(SkipConfig, args).offload_prefix is (not flag)
