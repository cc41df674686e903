"""Synthetic class names: distinct, deterministic and of one prompt length, for the benchmarks,
the memory plan and the tests at any class count."""
from __future__ import annotations

WORDS = ("alpine", "brindled", "crested", "dappled", "eastern", "feathered", "giant", "hooded", "indian",
         "jungle", "king", "lesser", "marbled", "northern", "olive", "painted", "royal", "spotted", "tufted")


# The words of WORDS that CLIP's tokenizer keeps whole (one token each)
NAME_WORDS = ("alpine", "crested", "eastern", "giant", "hooded", "indian", "jungle", "king", "lesser", "northern",
              "olive", "painted", "royal", "spotted")


def class_names(count: int) -> list[str]:
    """Distinct, deterministic names of one length: class i spells i in base 14 with one-token
    words, 4 words up to 14**4 = 38,416 classes. Every prompt has the same number of tokens at
    any class count, so a cost measured against the class count is not one of prompt length."""
    base = len(NAME_WORDS)
    length = 4
    while base ** length < count:
        length += 1
    names = []
    for i in range(count):
        digits = [(i // base ** k) % base for k in range(length)]
        names.append(" ".join(NAME_WORDS[d] for d in digits))
    return names
