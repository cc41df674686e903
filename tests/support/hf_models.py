"""Tiny random Hugging Face CLIP and SigLIP models built in the tests (no downloads), and a
tokenizer for them: any callable texts -> LongTensor works as a SkipTuner tokenizer."""
import zlib

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'skipkernels[hf]')")

VOCAB, CONTEXT, WIDTH = 1000, 16, 32
BOS, EOS, PAD = 998, 999, 0


def tiny_hf(family: str, seed: int = 0, attn_implementation: str = "sdpa"):
    import transformers
    torch.manual_seed(seed)
    tower = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=3, num_attention_heads=4)
    text = dict(tower, vocab_size=VOCAB, max_position_embeddings=CONTEXT)
    vision = dict(tower, image_size=32, patch_size=8)
    if family == "clip":
        config = transformers.CLIPConfig(text_config=dict(text, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD),
                                         vision_config=vision, projection_dim=24)
        model = transformers.CLIPModel(config)
    elif family == "siglip":
        config = transformers.SiglipConfig(text_config=dict(text, projection_size=WIDTH), vision_config=vision)
        model = transformers.SiglipModel(config)
    else:  # SigLIP 2 (NaFlex): a 4 x 4 position-embedding grid, so 32 x 32 images at patch 8
        config = transformers.Siglip2Config(text_config=dict(text, projection_size=WIDTH),
                                            vision_config=dict(tower, num_patches=16, patch_size=8))
        model = transformers.Siglip2Model(config)
    model.config._attn_implementation = attn_implementation
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = attn_implementation
    return model.eval()


def image_features(model, images):
    """``get_image_features`` as transformers is called; SigLIP 2 takes its image processor's
    patches (``convert_image_to_patches``), their grid's shape and a mask of valid patches."""
    if type(model).__name__ != "Siglip2Model":
        return model.get_image_features(pixel_values=images).pooler_output
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
    patch = model.config.vision_config.patch_size
    patches = torch.stack([convert_image_to_patches(image, patch) for image in images])
    shapes = torch.tensor([[images.shape[2] // patch, images.shape[3] // patch]] * len(images))
    mask = torch.ones(patches.shape[:2], dtype=torch.long)
    out = model.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
    return out.pooler_output


def tokenize(texts):
    """BOS, one id per word (a hash), EOS, then padding to the context."""
    out = torch.full((len(texts), CONTEXT), PAD, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [1 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in text.split()][: CONTEXT - 2]
        ids = [BOS, *words, EOS]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


# The class names whose words word_tokenizer knows (tests/models/test_hf_models.py's CLASSES)
WORD_CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "cat", "dog"]


def word_tokenizer():
    """A Hugging Face fast tokenizer over a small word vocabulary, with CLIP's BOS/EOS/padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = sorted({w.strip(".") for c in WORD_CLASSES for w in f"a photo of a {c}.".split()} | {".", "X"})
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}, "<bos>": 998, "<eos>": 999}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 998), ("<eos>", 999)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
