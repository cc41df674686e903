"""SkipTuner's set-up: class prompts tokenised once, the text prefix cache built in chunks, CSkip's
zero-shot prototypes from the same pass, and the one way to configure the tuner (SkipConfig)."""
import copy
import dataclasses

import pytest
import torch

from conftest import tiny_clip
from skipkernels import SkipConfig, SkipTuner
from skipkernels.skip import lskip

# prompts of several lengths, so chunks of them are truncated to different lengths
CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "a very long class name with many words",
           "cat", "dog", "purple hexagon", "an even longer class name than the long one, with commas and words",
           "ox", "small grey mouse"]


class CountingTokenizer:
    """The given tokenizer, counting the texts it tokenises."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, texts):
        self.texts += list(texts)
        return self.tokenizer(texts)


def test_class_prompts_are_tokenised_once(tokenizer):
    counting = CountingTokenizer(tokenizer)
    tuner = SkipTuner(tiny_clip(layers=3), CLASSES, counting, SkipConfig(skip_layers=1, top_ratio=0.5))
    prompts = [f"a photo of a {c}." for c in CLASSES]
    assert counting.texts == prompts  # the cache, the prototypes and the steps share one tokenisation
    tuner.encode_classes(CLASSES)  # the tuner's own classes: their tokens are reused
    assert counting.texts == prompts
    tuner.encode_classes(["cat", "owl"])  # another list is tokenised
    assert counting.texts[len(prompts):] == ["a photo of a cat.", "a photo of a owl."]


@pytest.mark.parametrize("mode", ["skip", "lskip"])
def test_the_prefix_cache_built_in_chunks_equals_the_one_built_at_once(mode, tokenizer, monkeypatch):
    model = tiny_clip(layers=3)
    at_once = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=2))
    monkeypatch.setattr(lskip, "PROMPT_CHUNK", 3)  # 11 prompts: four chunks, the last of two
    chunked = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, SkipConfig(mode=mode, skip_layers=2))
    # each prompt's rows are computed by the same ops whatever else is in its chunk
    assert torch.equal(chunked.text_cache.tokens_at_block, at_once.text_cache.tokens_at_block)
    assert torch.equal(chunked.text_cache.pool_index, at_once.text_cache.pool_index)


def _fp64_prototypes(model, tokenizer, omega):
    """The zero-shot text features of ``model`` computed in fp64 (lskip: nothing is selected)."""
    reference = SkipTuner(copy.deepcopy(model).double(), CLASSES, tokenizer, SkipConfig(mode="lskip", skip_layers=omega))
    return reference.encode_classes(CLASSES, normalize=True)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_prototypes_from_the_prefix_pass_equal_the_zero_shot_text_features(chunk, tokenizer, monkeypatch):
    """CSkip's prototypes come from the cache's pass (blocks [0, omega) once, then [omega, L) on each
    chunk) and equal ``encode_classes`` of the pretrained model, the path they were computed by
    before. Where chunks truncate prompts to other lengths than ``encode_classes``' batches the
    summation order may differ: both must then be as close to an fp64 reference as fp32 allows."""
    monkeypatch.setattr(lskip, "PROMPT_CHUNK", chunk)
    model = tiny_clip(layers=4, seed=3)
    tuner = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, SkipConfig(skip_layers=2, top_ratio=0.5))
    prototypes = tuner.skipper.prototypes
    tuner.eval()  # as at set-up: eval mode, no autograd (either may route an op to another kernel)
    with torch.no_grad():
        zero_shot = tuner.encode_classes(CLASSES, normalize=True)  # no update yet: the pretrained model's
    zero_shot = torch.nn.functional.normalize(zero_shot, dim=-1)  # as ClassSkipper normalises what it is given
    reference = _fp64_prototypes(model, tokenizer, 2)
    error = (prototypes.double() - reference).abs().max().item()
    zero_shot_error = (zero_shot.double() - reference).abs().max().item()
    # Unit vectors of entries ~0.14 through 4 fp32 blocks: both paths are a few fp32 roundings
    # (2**-24 ~ 6e-8) from fp64 (measured 2.3e-7 and 2.4e-7), while a wrong prefix, prompt or block
    # moves them by the order of the entries. The prototypes are as accurate as the old path, to
    # 4 roundings, and within 1e-6 of it.
    assert zero_shot_error <= 1e-6
    assert error <= zero_shot_error + 4 * 2**-24
    assert (prototypes - zero_shot).abs().max().item() <= 1e-6
    if chunk >= len(CLASSES):  # one chunk, one batch: the same ops in the same order
        assert torch.equal(prototypes, zero_shot)


def test_prototypes_are_computed_before_the_cast_to_a_lower_precision_cache(tokenizer):
    model = tiny_clip(layers=4, seed=3)
    fp32 = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, SkipConfig(skip_layers=2, cache_dtype="float32"))
    bf16 = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, SkipConfig(skip_layers=2, cache_dtype="bfloat16"))
    assert bf16.text_cache.tokens_at_block.dtype == torch.bfloat16
    assert torch.equal(bf16.skipper.prototypes, fp32.skipper.prototypes)
    # what prototypes from the cast cache would have been: measurably different
    cache = bf16.text_cache
    from_cast = bf16.towers.text.encode_from(cache.tokens_at_block.float(), 2, cache.pool_index, bf16.prune_text)
    from_cast = torch.nn.functional.normalize(from_cast, dim=-1)
    assert (from_cast - fp32.skipper.prototypes).abs().max() > 1e-4


def test_cskip_without_a_cache_keeps_the_encode_classes_prototypes(tokenizer):
    model = tiny_clip(layers=3)
    tuner = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, SkipConfig(mode="cskip", top_ratio=0.5))
    assert tuner.text_cache is None
    tuner.eval()
    with torch.no_grad():
        zero_shot = torch.nn.functional.normalize(tuner.encode_classes(CLASSES, normalize=True), dim=-1)
    assert torch.equal(tuner.skipper.prototypes, zero_shot)


def test_chunking_changes_neither_k_prime_nor_the_selected_classes(tokenizer, monkeypatch):
    model = tiny_clip(layers=3)
    images, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 4, 8, 9])
    results = []
    for chunk in (1024, 2):
        monkeypatch.setattr(lskip, "PROMPT_CHUNK", chunk)
        tuner = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, SkipConfig(skip_layers=1, top_ratio=0.25), seed=7)
        tuner.loss(tuner.image_prefix(images), labels)
        results.append((tuner.skipper.fixed_size, tuner.last_selected.tolist(), tuner.last_labels.tolist()))
    assert results[0] == results[1]


def test_keyword_overrides_still_work_with_a_future_warning(tokenizer):
    model = tiny_clip(layers=3)
    with pytest.warns(FutureWarning, match=r"pass config=SkipConfig\(mode='lskip', skip_layers=1\)"):
        tuner = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, mode="lskip", skip_layers=1)
    assert tuner.config == SkipConfig(mode="lskip", skip_layers=1)
    base = SkipConfig(mode="skip", skip_layers=1)
    with pytest.warns(FutureWarning, match=r"pass config=dataclasses.replace\(config, top_ratio=0.25\)"):
        tuner = SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, base, top_ratio=0.25)
    assert tuner.config == dataclasses.replace(base, top_ratio=0.25)
    with pytest.raises(TypeError, match="omega"):
        SkipTuner(copy.deepcopy(model), CLASSES, tokenizer, omega=2)


def test_a_config_alone_warns_nothing(tokenizer, recwarn):
    SkipTuner(tiny_clip(layers=3), CLASSES, tokenizer, SkipConfig(skip_layers=1), policy="torch", seed=2)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
