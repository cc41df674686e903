"""Skip Tuning of Hugging Face transformers models (CLIPModel, SiglipModel): tiny random configs
built here, no downloads."""
import copy

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'skipkernels[hf]')")

from hf_models import CONTEXT, image_features, tiny_hf, tokenize, word_tokenizer as _word_tokenizer  # noqa: E402
from skipkernels import SkipConfig, SkipTuner, patch_clip, unpatch_clip
from skipkernels.pet import pet_config

CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "cat", "dog"]
FAMILIES = ["clip", "siglip", "siglip2"]


def _features(model, ids, images):
    with torch.no_grad():
        return model.get_text_features(input_ids=ids).pooler_output, image_features(model, images)


def _relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_features_equal_the_models_own(family, attention):
    model = tiny_hf(family, attn_implementation=attention)
    plain = copy.deepcopy(model)
    ids = tokenize(["a photo of a cat", "dog", "a red circle on a long table"])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _features(plain, ids, images)
    patch_clip(model)
    assert all("forward" in layer.__dict__ for layer in model.text_model.encoder.layers)
    for got, want in zip(_features(model, ids, images), expected):
        assert _relative(got, want) <= 1e-6
    unpatch_clip(model)
    assert not any("forward" in layer.__dict__ for layer in model.text_model.encoder.layers)
    for got, want in zip(_features(model, ids, images), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tuners_features_are_the_models_own(family):
    model = tiny_hf(family)
    tuner = SkipTuner(copy.deepcopy(model), CLASSES, tokenize, SkipConfig(mode="ft"))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    text, image = _features(model, tokenize([f"a photo of a {c}." for c in CLASSES]), images)
    with torch.no_grad():
        assert _relative(tuner.encode_classes(CLASSES), text) <= 1e-6
        assert _relative(tuner.encode_images(images), image) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_loss_and_gradients_equal_plain_autograd(family):
    """The loss is the cross-entropy of the plain model's logits over the tuner's class subset;
    blocks >= omega get plain autograd's gradients, blocks < omega none."""
    omega = 1
    model = tiny_hf(family)
    plain = copy.deepcopy(model)
    tuner = SkipTuner(model, CLASSES, tokenize, SkipConfig(mode="skip", skip_layers=omega, top_ratio=0.34, max_top=2))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([4, 1])
    loss = tuner.loss(tuner.image_prefix(images), labels)
    loss.backward()
    selected = tuner.last_selected

    ids = tokenize([f"a photo of a {c}." for c in CLASSES])[selected]
    f = image_features(plain, images)
    t = plain.get_text_features(input_ids=ids).pooler_output
    logits = plain.logit_scale.exp() * torch.nn.functional.normalize(f, dim=-1) @ \
        torch.nn.functional.normalize(t, dim=-1).T
    expected = torch.nn.functional.cross_entropy(logits, tuner.last_labels)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))

    plain_params = dict(plain.named_parameters())
    for tower in ("vision_model", "text_model"):
        for index, layer in enumerate(getattr(model, tower).encoder.layers):
            for name, p in layer.named_parameters():
                ref = plain_params[f"{tower}.encoder.layers.{index}.{name}"].grad
                if index < omega:
                    assert p.grad is None, (tower, index, name)
                else:
                    torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip_gives_the_tuned_features(family, tmp_path):
    import transformers
    model = patch_clip(tiny_hf(family))
    tuner = SkipTuner(model, CLASSES, tokenize, SkipConfig(mode="lskip", skip_layers=1))
    optimizer = torch.optim.SGD(tuner.parameter_groups(lr=0.5), lr=0.5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tuner.loss(tuner.image_prefix(images), torch.tensor([0, 2])).backward()
    optimizer.step()
    unpatch_clip(model)
    ids = tokenize(["a photo of a cat"])
    tuned = _features(model, ids, images)
    model.save_pretrained(tmp_path / "tuned")
    loaded = getattr(transformers, type(model).__name__).from_pretrained(tmp_path / "tuned").eval()
    state = loaded.state_dict()
    assert list(state) == list(tiny_hf(family).state_dict())  # the weights keep their names
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the tuned weights, bit for bit
    # Features bit for bit from those weights in memory of the model's own; from_pretrained maps
    # them at unaligned file offsets, where the CPU GEMM may take another path (an ulp apart).
    fresh = tiny_hf(family)
    fresh.load_state_dict(state)
    for got, want in zip(_features(fresh, ids, images), tuned):
        assert torch.equal(got, want)
    for got, want in zip(_features(loaded, ids, images), tuned):
        assert _relative(got, want) <= 1e-6


def test_savings_follow_each_family():
    siglip2 = SkipTuner(tiny_hf("siglip2"), CLASSES, tokenize, SkipConfig(skip_layers=1))
    assert siglip2.savings["image last-block pruning"].startswith("off (the image tower pools with attention")
    clip = SkipTuner(tiny_hf("clip"), CLASSES, tokenize, SkipConfig(skip_layers=1))
    assert set(clip.savings.values()) == {"on"}
    siglip = SkipTuner(tiny_hf("siglip"), CLASSES, tokenize, SkipConfig(skip_layers=1))
    assert siglip.savings["text truncation"].startswith("off (the text attention is not causal")
    assert siglip.savings["image last-block pruning"].startswith("off (the image tower pools with attention")
    assert siglip.savings["text last-block pruning"] == "on"
    assert "transformers SiglipModel vision" in repr(siglip)


def test_hf_tokenizers_and_processors_are_padded_to_the_context():
    from skipkernels.families import PaddedTokens, token_function
    tokenizer = _word_tokenizer()
    tokens = token_function(tokenizer, CONTEXT)
    assert isinstance(tokens, PaddedTokens)
    ids = tokens(["a cat", "dog"])
    assert ids.dtype == torch.long and ids.shape == (2, CONTEXT)

    class Processor:  # a processor holds its tokenizer
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer
    assert torch.equal(token_function(Processor(tokenizer), CONTEXT)(["a cat", "dog"]), ids)
    assert token_function(tokenize, CONTEXT) is tokenize  # a callable to token ids is used as it is


PET_METHODS = ["vlpet-large", "vlpet-small", "adapter", "lora"]
ALL_PROJECTIONS = ("q", "k", "v", "out", "fc1", "fc2")


@pytest.mark.parametrize("method", PET_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pet_on_hf_models_runs_on_the_plan_and_undoes_cleanly(family, method):
    """apply_pet on a transformers model: its layers run the op layer's plan with the modules as
    hooks (LoRA on q, k, v weight-level). At initialisation the model is the original; with
    random modules LoRA equals its merged weights (fp64), and remove() gives the original back."""
    from pet_checks import randomize
    from skipkernels.pet import apply_pet
    model = tiny_hf(family).double()
    base = copy.deepcopy(model)
    ids = tokenize(["a photo of a cat", "dog"])
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = _features(base, ids, images)
    extra = dict(targets=ALL_PROJECTIONS) if method == "lora" else {}
    handle = apply_pet(model, pet_config(method, skip_layers=1, **extra))
    assert all("forward" in layer.__dict__ for layer in model.text_model.encoder.layers[1:])
    for got, want in zip(_features(model, ids, images), expected):
        assert _relative(got, want) <= 1e-12
    randomize(handle)
    tuned = _features(model, ids, images)
    assert _relative(tuned[0], expected[0]) > 1e-3
    patch_clip(model)
    unpatch_clip(model)  # a layer holding PET modules keeps a forward that applies them
    for got, want in zip(_features(model, ids, images), tuned):
        assert _relative(got, want) <= 1e-12
    if method == "lora":
        handle.merge()
        for got, want in zip(_features(model, ids, images), tuned):
            assert _relative(got, want) <= 1e-12
    else:
        handle.remove()
        for got, want in zip(_features(model, ids, images), expected):
            assert torch.equal(got, want)
        assert list(model.state_dict()) == list(base.state_dict())


@pytest.mark.parametrize("mode", ["lskip-vlpet-large", "lskip-lora"])
def test_pet_modes_of_the_tuner_train_only_the_modules(mode):
    tuner = SkipTuner(tiny_hf("clip"), CLASSES, tokenize, SkipConfig(mode=mode, skip_layers=1))
    tuner.loss(tuner.image_prefix(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3])).backward()
    trained = {name for name, p in tuner.named_parameters() if p.grad is not None}
    assert trained and all(".pet_" in name or ".lora" in name for name in trained)
    assert not any("layers.0." in name for name in trained)  # blocks < omega get no modules


def test_siglip2_patches_are_its_image_processors():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    from skipkernels.families import model_towers
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    patches, shapes = model_towers(tiny_hf("siglip2"))[0].patches(images)
    assert torch.equal(patches, torch.stack([convert_image_to_patches(image, 8) for image in images]))
    assert shapes.tolist() == [[4, 4], [4, 4]]


def test_finetune_runs_from_the_cli_on_a_saved_hf_model(tmp_path, synthetic_root):
    import json

    from skipkernels.cli import main
    folder = tmp_path / "tiny-clip"
    tiny_hf("clip").save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    out = tmp_path / "run"
    code = main(["finetune", "--data", str(synthetic_root), "--dataset", "synthetic", "--model", f"hf:{folder}",
                 "--mode", "skip", "--skip-layers", "1", "--epochs", "1", "--batch-size", "8", "--shots", "2",
                 "--warmup-epochs", "0", "--no-progress", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] and results["model"] == f"hf:{folder}"
    assert 0 <= results["accuracy"]["base"] <= 100 and results["exact_savings"]["text truncation"] == "on"
    # the tuned model loads back for evaluation and prediction, its weights those of model.pt
    from skipkernels.prediction import load_classifier
    tuner = load_classifier(["cat", "dog"], checkpoint=str(out))
    saved = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in tuner.model.state_dict().items())
    assert type(tuner.model).__name__ == "CLIPModel"


def test_bench_runs_a_saved_hf_model(tmp_path):
    import json

    from skipkernels.cli import main
    folder = tmp_path / "tiny-siglip"
    tiny_hf("siglip").save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--model", f"hf:{folder}", "--modes", "skip-ref,skip-kernels,paper", "--no-memory",
                 "--repeats", "1", "--warmup", "0", "--no-epoch", "--out", str(out)]) == 0
    report = json.loads(next(out.glob("e2e-cpu-*.json")).read_text())
    assert report["results"]["skip-kernels"]["step_s"]["median"] > 0
    assert "open_clip CLIP models" in report["results"]["paper"]["skipped"]



def test_info_shows_a_saved_hf_models_plan(tmp_path, capsys):
    from skipkernels.cli import main
    folder = tmp_path / "tiny-clip"
    tiny_hf("clip").save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    assert main(["info", "--model", f"hf:{folder}"]) == 0
    printed = capsys.readouterr().out
    assert "image tower: transformers CLIPModel vision, 3 blocks (CLIPEncoderLayer)" in printed
    assert "blocks 0-2 (CLIPEncoderLayer):" in printed and "text truncation: on" in printed


@pytest.mark.parametrize("family", FAMILIES)
def test_coop_trains_only_the_prompt_context(family):
    tuner = SkipTuner(tiny_hf(family), CLASSES, tokenize, SkipConfig(mode="coop", coop_n_ctx=2))
    loss = tuner.loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 5]))
    loss.backward()
    trained = [name for name, p in tuner.named_parameters() if p.grad is not None]
    assert trained == ["prompt_learner.ctx"] and torch.isfinite(loss)


def test_a_patched_hf_models_policy_is_the_tuners_default():
    from skipkernels import KernelPolicy
    policy = KernelPolicy("torch", table="hf.json")
    tuner = SkipTuner(patch_clip(tiny_hf("clip"), policy=policy), CLASSES, tokenize, SkipConfig(skip_layers=1))
    assert tuner.policy is policy and tuner.bound_policy is policy
