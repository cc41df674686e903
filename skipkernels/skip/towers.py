"""The two CLIP towers cut at a block index, for LSkip's frozen prefix and trainable suffix.

Image: stem (patch conv, class token, positional embedding, patch dropout, ln_pre) -> blocks ->
pool + ln_post -> proj. Text: token + positional embedding -> causal blocks -> ln_final -> pool
at the model's own pooling position -> text_projection.

Two exact savings live here (DESIGN.md section 3):
- text truncation: attention is causal and the text is pooled at one position per prompt, so
  tokens after the last pooled position of a set of prompts never influence it; those prompts
  run on the prefix [0, T) with T = that position + 1, padded to a multiple of 8;
- last-block pruning: after the final block only the pooled token is read (CLS for 'tok'
  pooling, the EOT/EOS position for text), so that block computes only that row's query,
  residual and MLP. Both switch off where pooling reads more than one token (e.g. 'avg').
"""
from __future__ import annotations

import torch
import torch.nn as nn

from skipkernels.ops.block import block_forward, blocks_forward
from skipkernels.patch import clip_towers

TEXT_PAD_MULTIPLE = 8


def check_skip_layers(model, skip_layers: int) -> None:
    image_blocks, text_blocks = clip_towers(model)
    depth = min(len(image_blocks), len(text_blocks))
    if not isinstance(skip_layers, int) or isinstance(skip_layers, bool):
        raise TypeError(f"skip_layers must be an int, got {type(skip_layers).__name__}")
    if not 0 <= skip_layers < depth:
        raise ValueError(f"skip_layers must be in [0, {depth}) for this model (image tower "
                         f"{len(image_blocks)} blocks, text tower {len(text_blocks)} blocks), got {skip_layers}")


def run_blocks(blocks, x, causal: bool = False, prune_index=None):
    """Blocks through the op layer; blocks holding parameter-efficient modules (``skipkernels.pet``)
    run as modules, since the op layer reads weights directly and would bypass them. Those blocks
    are not pruned: the full last block runs and the pooled rows are taken after it."""
    from skipkernels.pet import block_has_pet
    blocks = list(blocks)
    if not any(block_has_pet(b) for b in blocks):
        return blocks_forward(blocks, x, causal=causal, prune_last_index=prune_index)
    mask = None
    if causal:  # open_clip's additive causal mask, for the blocks that run as modules
        length = x.shape[1]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        if block_has_pet(block):
            x = block(x, attn_mask=mask)
            if last and prune_index is not None:
                x = x[torch.arange(x.shape[0], device=x.device), prune_index].unsqueeze(1)
        else:
            x = block_forward(block, x, causal=causal, query_index=prune_index if last else None)
    return x


# ----------------------------------------------------------------------------------- image
def image_depth(model) -> int:
    return len(model.visual.transformer.resblocks)


def image_prunable(model) -> bool:
    visual = model.visual
    return getattr(visual, "attn_pool", None) is None and visual.pool_type == "tok"


def image_stem(model, images):
    return model.visual._embeds(images)


def image_blocks(model, x, start: int, stop: int, prune_last: bool = False):
    blocks = model.visual.transformer.resblocks[start:stop]
    if len(blocks) == 0:
        return x
    prune = None
    if prune_last and stop == image_depth(model) and image_prunable(model):
        prune = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # CLS row
    return run_blocks(blocks, x, prune_index=prune)


def image_head(model, x):
    """Pool, ln_post and project the output of the last block ((B, L, D) or the pruned (B, 1, D))."""
    visual = model.visual
    if x.shape[1] == 1 and image_prunable(model):
        pooled = visual.ln_post(x[:, 0])
    else:
        pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def encode_image_from(model, x, start: int, prune_last: bool = True):
    """Image features from the tokens entering block ``start``."""
    return image_head(model, image_blocks(model, x, start, image_depth(model), prune_last))


def encode_image(model, images, prune_last: bool = True):
    """Image features of ``images`` through the whole tower."""
    return encode_image_from(model, image_stem(model, images), 0, prune_last)


# ------------------------------------------------------------------------------------ text
def text_depth(model) -> int:
    return len(model.transformer.resblocks)


def text_pool_index(model, tokens) -> torch.Tensor:
    """Position each prompt is pooled at, by the model's own rule (not a blanket argmax)."""
    pool = getattr(model, "text_pool_type", "argmax")
    length = tokens.shape[1]
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        eos = getattr(model, "text_eos_id", None)
        if eos is None:
            raise ValueError("text pool type 'eos' needs the model's text_eos_id")
        return (tokens == eos).int().argmax(dim=-1)
    if pool == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    if pool == "last":
        return torch.full((tokens.shape[0],), length - 1, dtype=torch.long, device=tokens.device)
    raise ValueError(f"text pool type {pool!r} reads more than one token; it is not supported")


def truncated_length(pool_index, context_length: int) -> int:
    """Smallest multiple of 8 covering every pooled position (capped at the context length)."""
    needed = int(pool_index.max()) + 1 if len(pool_index) else 1
    padded = -(-needed // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE
    return min(padded, context_length)


def text_embed(model, tokens, prompt_embeddings=None):
    """Token + positional embedding of ``tokens`` (C, T); ``prompt_embeddings`` replaces the
    token embeddings when given (CoOp's learned context)."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens) if prompt_embeddings is None else prompt_embeddings
    x = x.to(cast_dtype)
    return x + model.positional_embedding[: tokens.shape[1]].to(cast_dtype)


def text_blocks(model, x, start: int, stop: int, pool_index=None):
    """Causal blocks [start, stop); with ``pool_index`` and ``stop`` = depth the last is pruned."""
    blocks = model.transformer.resblocks[start:stop]
    if len(blocks) == 0:
        return x
    prune = pool_index if (pool_index is not None and stop == text_depth(model)) else None
    return run_blocks(blocks, x, causal=True, prune_index=prune)


def text_head(model, x, pool_index):
    """ln_final, pool and project; ``x`` is (C, T, D) or the pruned (C, 1, D)."""
    if x.shape[1] == 1:  # pruned last block (or a one-token prompt): the row is the pooled token
        pooled = model.ln_final(x[:, 0])
    else:
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = model.ln_final(x[rows, pool_index])
    projection = model.text_projection
    if projection is not None:
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
    return pooled


def encode_text_from(model, x, start: int, pool_index, prune_last: bool = True):
    """Text features from the tokens entering block ``start``."""
    depth = text_depth(model)
    out = text_blocks(model, x, start, depth, pool_index if prune_last else None)
    return text_head(model, out, pool_index)


def encode_text(model, tokens, prompt_embeddings=None, truncate: bool = True, prune_last: bool = True):
    """Text features of ``tokens`` (C, L) through the whole tower, truncated to the longest prompt
    (exact, see the module docstring); ``prompt_embeddings`` replace the token embeddings (CoOp)."""
    pool_index = text_pool_index(model, tokens)
    length = truncated_length(pool_index.cpu(), tokens.shape[1]) if truncate else tokens.shape[1]
    emb = None if prompt_embeddings is None else prompt_embeddings[:, :length]
    x = text_embed(model, tokens[:, :length], emb)
    return encode_text_from(model, x, 0, pool_index, prune_last)
