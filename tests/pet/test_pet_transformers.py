"""PET on tiny random-weight Hugging Face encoder-decoders (BART, T5), built locally."""

import pytest
import torch
import torch.nn as nn

from skipkernels._compat import import_torchvision

# transformers imports torchvision when present; the CPU-torch workaround must come first.
import_torchvision()
transformers = pytest.importorskip("transformers",
                                   reason="transformers is not installed (pip install 'skipkernels[hf]')")

from skipkernels.pet import METHODS, apply_pet, find_blocks  # noqa: E402
from skipkernels.pet.modules import VLPETModifier  # noqa: E402
from pet_checks import assert_only_pet_parameters_got_gradients, frozen_copy, method_config, one_thread, randomize  # one_thread: autouse  # noqa: E402

D, FFN, LAYERS, VOCAB = 32, 64, 2, 100
RANK, HEADS, GATE_RANK = 8, 4, 4


def make_bart(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                  encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=32,
                                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return transformers.BartModel(cfg).eval()


def make_t5(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=FFN, num_layers=LAYERS,
                                num_decoder_layers=LAYERS, num_heads=4, dropout_rate=0.0)
    return transformers.T5Model(cfg).eval()


MAKERS = {"bart": make_bart, "t5": make_t5}


@pytest.fixture(params=["bart", "t5"])
def family(request):
    return request.param


def inputs(seed=1, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(3, VOCAB, (batch, 9), generator=gen),
            torch.randint(3, VOCAB, (batch, 5), generator=gen))


def run(model, ids, dec):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=dec).last_hidden_state


def config(method, **kw):
    return method_config(method, rank=RANK, heads=HEADS, gate_rank=GATE_RANK, **kw)


def test_blocks_found(family):
    blocks = find_blocks(MAKERS[family]())
    assert [(b.index, b.is_decoder, b.width) for b in blocks] == \
        [(0, False, D), (1, False, D), (0, True, D), (1, True, D)]
    assert all(b.family == family for b in blocks)
    assert set(blocks[2].sublayers) == {"attn", "cross", "mlp"}


@pytest.mark.parametrize("method", METHODS)
def test_zero_up_projection_keeps_the_model(family, method):
    model = MAKERS[family]()
    ids, dec = inputs()
    ref = run(frozen_copy(model), ids, dec)
    handle = apply_pet(model, config(method))
    assert torch.equal(run(model, ids, dec), ref)
    randomize(handle)
    assert not torch.allclose(run(model, ids, dec), ref)


def _expected_count(method, decoder_blocks=LAYERS, encoder_blocks=LAYERS):
    d, r, g = D, RANK, GATE_RANK
    adapter = d * r + r + r * d + d
    per_sub = {"vlpet-large": adapter + d * g + g + g * d + d, "vlpet-middle-x": adapter + d + 1,
               "vlpet-middle-y": adapter + d, "vlpet-small": adapter + 2 * d + 1}
    if method in per_sub:
        # Encoder: attn + mlp per block; decoder: the cross-attention value adapter only.
        return per_sub[method] * 2 * encoder_blocks + adapter * decoder_blocks
    if method == "adapter":
        return adapter * 2 * (encoder_blocks + decoder_blocks)
    lora_qkv = 3 * (r * d + d * r)
    return lora_qkv * encoder_blocks + 2 * lora_qkv * decoder_blocks  # decoder: self + cross


@pytest.mark.parametrize("method", METHODS)
def test_placement_and_counts(family, method):
    model = MAKERS[family]()
    handle = apply_pet(model, config(method))
    assert handle.num_trainable() == _expected_count(method)
    names = list(handle.modules)
    decoder = [n for n in names if n.startswith("decoder.")]
    encoder = [n for n in names if n.startswith("encoder.")]
    if method.startswith("vlpet"):
        assert len(encoder) == 2 * LAYERS and all(n.endswith(("pet_attn", "pet_mlp")) for n in encoder)
        value = "encoder_attn.v_proj" if family == "bart" else "EncDecAttention.v"
        assert len(decoder) == LAYERS and all(n.endswith(f"{value}.pet_value_adapter") for n in decoder)
        for n in encoder:
            assert isinstance(handle.modules[n], VLPETModifier)


def test_skip_layers_and_decoder_none(family):
    model = MAKERS[family]()
    handle = apply_pet(model, config("vlpet-large", skip_layers=1, decoder="none"))
    assert sorted(handle.modules) == sorted(
        [f"encoder.{'layers' if family == 'bart' else 'block'}.1.pet_{k}" for k in ("attn", "mlp")])
    assert handle.num_trainable() == _expected_count("vlpet-large", 0, 1)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_pet_parameters(family, method):
    model = MAKERS[family]()
    handle = apply_pet(model, config(method))
    randomize(handle)
    ids, dec = inputs()
    model(input_ids=ids, decoder_input_ids=dec).last_hidden_state.square().sum().backward()
    assert_only_pet_parameters_got_gradients(model, handle)


def test_hooked_sublayer_math_matches_the_formula(family):
    # The FFN sub-layer of encoder block 0: out = X + s · G ⊙ (H + ΔH), with X the residual stream.
    model = MAKERS[family]()
    handle = apply_pet(model, config("vlpet-small", targets=("mlp",), decoder="none", scale=0.7))
    randomize(handle)
    x = torch.randn(2, 6, D)
    if family == "bart":
        # Post-norm: X is fc1's input; the layer normalises X + branch afterwards.
        layer = model.encoder.layers[0]
        mod = layer.pet_mlp
        # nn.Linear.forward bypasses the module hooks: this is the frozen H.
        h = nn.Linear.forward(layer.fc2, layer.activation_fn(nn.Linear.forward(layer.fc1, x)))
        dh = mod.adapter(h)
        g = mod.gate(x, h + dh)
        expected = layer.final_layer_norm(x + 0.7 * g * (h + dh))
        with torch.no_grad():
            actual = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
    else:
        ff = model.encoder.block[0].layer[-1]
        mod = model.encoder.block[0].pet_mlp
        dense = ff.DenseReluDense
        hidden = dense.act(nn.Linear.forward(dense.wi, ff.layer_norm(x)))
        h = nn.Linear.forward(dense.wo, hidden)
        dh = mod.adapter(h)
        g = mod.gate(x, h + dh)
        expected = x + 0.7 * g * (h + dh)
        with torch.no_grad():
            actual = ff(x)
    assert g.shape == (2, 1, 1)
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("targets", [("q", "k", "v"), ("v", "out", "fc1", "fc2")])
def test_lora_merge_matches_unmerged(family, targets):
    model = MAKERS[family]()
    ids, dec = inputs()
    handle = apply_pet(model, config("lora", targets=targets, alpha=16))
    randomize(handle, std=0.1)
    before = run(model, ids, dec)
    keys = list(handle.base_state_dict())
    handle.merge()
    torch.testing.assert_close(run(model, ids, dec), before, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_the_model(family, method):
    model = MAKERS[family]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, dec = inputs()
    ref = run(model, ids, dec)
    handle = apply_pet(model, config(method))
    assert list(handle.base_state_dict()) == list(state)
    randomize(handle)
    handle.remove()
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert torch.equal(run(model, ids, dec), ref)


@pytest.mark.parametrize("method", METHODS)
def test_sgd_steps_lower_the_loss(family, method):
    model = MAKERS[family]()
    handle = apply_pet(model, config(method))
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (8, 9), generator=gen)
    dec = torch.randint(3, VOCAB, (8, 4), generator=gen)
    labels = torch.arange(8) % 4
    head = torch.randn(4, D, generator=gen)  # a fixed (untrained) classifier
    opt = torch.optim.SGD(handle.parameters(), lr=0.05, momentum=0.9)
    model.train()

    def loss_fn():
        feats = model(input_ids=ids, decoder_input_ids=dec).last_hidden_state.mean(1)
        return nn.functional.cross_entropy(feats @ head.T, labels)

    first = None
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn()
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = loss_fn().item()
    assert final < first - 0.05, (first, final)
