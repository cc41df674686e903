"""Write a Hugging Face CLIP ViT-B/16 (random weights, the real architecture) and a word tokenizer
to a folder, so ``skipkernels bench --model hf:FOLDER`` runs where no network reaches the hub.

    python bench/hf_clip_folder.py FOLDER [--tiny]

The tokenizer knows the words of the bench's class names and template; timing does not depend
on which ids they get. ``--tiny``: a small config with the same layer types, for a CPU dry run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def config(tiny: bool):
    import transformers
    if tiny:
        tower = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
        text, vision, projection = dict(tower), dict(tower, image_size=32, patch_size=8), 32
    else:
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        projection = 512
    text.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
                hidden_act="quick_gelu")
    vision.update(hidden_act="quick_gelu")
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from skipkernels.data.names import WORDS
    words = sorted(set(WORDS) | set("a photo of the class X .".split()))
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}, "<bos>": 49406, "<eos>": 49407}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", 49406), ("<eos>", 49407)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def main(argv=None) -> int:
    import transformers
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    transformers.CLIPModel(config(args.tiny)).save_pretrained(args.folder)
    word_tokenizer().save_pretrained(args.folder)
    print(f"wrote {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
