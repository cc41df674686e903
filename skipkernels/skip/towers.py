"""The two CLIP towers cut at a block index, for LSkip's frozen prefix and trainable suffix.

Image: stem -> blocks -> pool + norm -> projection; text: token + positional embedding -> blocks
(causal, or bidirectional for SigLIP) -> final norm -> pool at the model's own pooling position ->
projection. Where each family keeps these parts: ``skipkernels.families``.

Two exact savings live here (docs/ARCHITECTURE.md, "The algorithm"), each only where it is exact:
- text truncation: under a causal mask with the text pooled at one position per prompt, tokens
  after the last pooled position of a set of prompts never influence it; those prompts run on
  the prefix [0, T) with T = that position + 1, padded to a multiple of 8. Off without a causal
  mask, for 'last' pooling (SigLIP), and where a PET module mixes tokens (VL-PET's small gate);
- last-block pruning: after the final block only the pooled token is read (CLS for 'token'
  pooling, the EOT/EOS/last position for text), so that block computes only that row's query,
  residual and MLP. Off where pooling reads more than one token ('avg', attention pooling 'map').
"""
from __future__ import annotations

import torch
import torch.nn as nn

from skipkernels.families import model_towers
from skipkernels.ops.block import block_forward, unsupported_reason
from skipkernels.pet import block_hooks

TEXT_PAD_MULTIPLE = 8


def default_skip_layers(model) -> tuple[int, str]:
    """The default ω and why: the paper's proportion, half the blocks (6 of ViT-B/16's 12). One ω
    cuts both towers, so where their depths differ it is half of the shallower one."""
    image, text = model_towers(model)
    n_image, n_text = len(image.blocks), len(text.blocks)
    depth = min(n_image, n_text)
    blocks = f"the {depth} blocks" if n_image == n_text else \
        f"the shallower tower's {depth} blocks (image {n_image}, text {n_text})"
    return depth // 2, f"default: half of {blocks}"


def check_skip_layers(model, skip_layers: int) -> None:
    image, text = model_towers(model)
    depth = min(len(image.blocks), len(text.blocks))
    if not isinstance(skip_layers, int) or isinstance(skip_layers, bool):
        raise TypeError(f"skip_layers must be an int, got {type(skip_layers).__name__}")
    if not 0 <= skip_layers < depth:
        raise ValueError(f"skip_layers must be in [0, {depth}) for this model (image tower "
                         f"{len(image.blocks)} blocks, text tower {len(text.blocks)} blocks), got {skip_layers}")


def run_blocks(blocks, x, causal: bool = False, prune_index=None, block_kwargs=None, policy=None):
    """The one route through blocks: ``block_forward`` for every block the op layer computes
    (plain, patched or holding PET modules, under ``policy``), the others through their own forward
    with ``block_kwargs`` (e.g. Eva's rotary embedding). A last block that cannot be pruned
    exactly runs in full and the pooled rows are taken after it."""
    blocks = list(blocks)
    module_kwargs = None
    for i, block in enumerate(blocks):
        index = prune_index if i == len(blocks) - 1 else None
        hooks = block_hooks(block)
        if hooks is not None:
            pruned = index if hooks.row_wise else None
            x = block_forward(block, x, causal=causal, query_index=pruned, policy=policy, hooks=hooks)
            if pruned is not None:
                continue
        else:
            if module_kwargs is None:
                module_kwargs = _module_kwargs(x, causal, block_kwargs)
            x = block(x, **module_kwargs)
        if index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)
    return x


def _module_kwargs(x, causal: bool, block_kwargs) -> dict:
    kwargs = dict(block_kwargs or {})
    if causal:  # open_clip's additive causal mask, for the blocks that run as modules
        length = x.shape[1]
        kwargs["attn_mask"] = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
    return kwargs


def _off_reason(blocks, reason: str | None) -> str | None:
    if reason is not None or not len(blocks):
        return reason
    hooks = block_hooks(blocks[-1])
    if hooks is None:
        return f"the last block ({type(blocks[-1]).__name__}) runs its own forward"
    if not hooks.row_wise:
        return "a PET module of the last block reads every token (VL-PET's small gate)"
    return None


# ----------------------------------------------------------------------------------- image
def image_depth(model) -> int:
    return len(model_towers(model)[0].blocks)


def image_pruning_off_reason(model) -> str | None:
    """Why last-block pruning does not apply to the image tower (None: it applies)."""
    image = model_towers(model)[0]
    return _off_reason(image.blocks, image.pruning_off_reason())


def image_stem(model, images):
    return model_towers(model)[0].stem(images)


def _exact(wanted: bool | None, off_reason, model) -> bool:
    """A saving's switch: None asks ``off_reason`` here; True or False is a caller's answer to that
    same question, decided once (SkipTuner.savings) instead of on every step."""
    return off_reason(model) is None if wanted is None else wanted


def image_blocks(model, x, start: int, stop: int, prune_last: bool | None = False, policy=None):
    """Image blocks [start, stop); LSkip's prefix is [0, skip_layers), its suffix [skip_layers, L).
    ``prune_last``: see ``_exact``."""
    image = model_towers(model)[0]
    blocks = image.blocks[start:stop]
    if len(blocks) == 0:
        return x
    prune = None
    if stop == len(image.blocks) and _exact(prune_last, image_pruning_off_reason, model):
        prune = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # CLS row
    return run_blocks(blocks, x, prune_index=prune, block_kwargs=image.block_kwargs(), policy=policy)


def image_head(model, x):
    """Pool, norm and project the output of the last block ((B, L, D) or the pruned (B, 1, D))."""
    return model_towers(model)[0].head(x)


def encode_image_from(model, x, start: int, prune_last: bool | None = None, policy=None):
    """Image features from the tokens entering block ``start`` (ω = ``skip_layers`` from LSkip)."""
    return image_head(model, image_blocks(model, x, start, image_depth(model), prune_last, policy))


def encode_image(model, images, prune_last: bool | None = None, policy=None):
    """Image features of ``images`` through the whole tower."""
    return encode_image_from(model, image_stem(model, images), 0, prune_last, policy)


# ------------------------------------------------------------------------------------ text
def text_depth(model) -> int:
    return len(model_towers(model)[1].blocks)


def text_truncation_off_reason(model) -> str | None:
    """Why text truncation does not apply (None: it applies)."""
    text = model_towers(model)[1]
    reason = text.truncation_off_reason()
    if reason is None:
        for block in text.blocks:
            hooks = block_hooks(block)
            if hooks is None and unsupported_reason(block) is None:
                return "a text block holds PET modules that run in its own forward"
            if hooks is not None and not hooks.row_wise:
                return "a PET module of the text tower reads every token (VL-PET's small gate)"
    return reason


def text_pruning_off_reason(model) -> str | None:
    """Why last-block pruning does not apply to the text tower (None: it applies)."""
    text = model_towers(model)[1]
    return _off_reason(text.blocks, text.pruning_off_reason())


def text_pool_index(model, tokens) -> torch.Tensor:
    """Position each prompt is pooled at, by the model's own rule (not a blanket argmax)."""
    text = model_towers(model)[1]
    pool = text.pool_type
    length = tokens.shape[1]
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        if text.eos_id is None:
            raise ValueError("text pool type 'eos' needs the model's text_eos_id")
        return (tokens == text.eos_id).int().argmax(dim=-1)
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


def token_embedding(model) -> nn.Embedding:
    return model_towers(model)[1].token_embedding


def text_context_length(model) -> int:
    return model_towers(model)[1].positional_embedding.shape[0]


def text_embed(model, tokens, prompt_embeddings=None):
    """Token + positional embedding of ``tokens`` (C, T); ``prompt_embeddings`` replaces the
    token embeddings when given (CoOp's learned context)."""
    text = model_towers(model)[1]
    cast_dtype = text.cast_dtype()
    x = text.token_embedding(tokens) if prompt_embeddings is None else prompt_embeddings
    x = x.to(cast_dtype)
    return x + text.positional_embedding[: tokens.shape[1]].to(cast_dtype)


def text_blocks(model, x, start: int, stop: int, pool_index=None, policy=None):
    """Blocks [start, stop); with ``pool_index`` and ``stop`` = depth the last is pruned. LSkip's
    prefix is [0, skip_layers), its suffix [skip_layers, L)."""
    text = model_towers(model)[1]
    blocks = text.blocks[start:stop]
    if len(blocks) == 0:
        return x
    if text.mask_kind == "custom":
        raise ValueError("text attention masks other than causal or none are not supported")
    prune = pool_index if (pool_index is not None and stop == len(text.blocks)) else None
    return run_blocks(blocks, x, causal=text.causal, prune_index=prune, policy=policy)


def text_head(model, x, pool_index):
    """Final norm, pool and project; ``x`` is (C, T, D) or the pruned (C, 1, D)."""
    text = model_towers(model)[1]
    if x.shape[1] == 1:  # pruned last block (or a one-token prompt): the row is the pooled token
        pooled = text.ln_final(x[:, 0])
    else:
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = text.ln_final(x[rows, pool_index])
    projection = text.text_projection
    if projection is not None:
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
    return pooled


def encode_text_from(model, x, start: int, pool_index, prune_last: bool | None = None, policy=None):
    """Text features from the tokens entering block ``start`` (ω = ``skip_layers`` from LSkip).
    ``prune_last``: see ``_exact``."""
    depth = text_depth(model)
    prune_last = _exact(prune_last, text_pruning_off_reason, model)
    out = text_blocks(model, x, start, depth, pool_index if prune_last else None, policy)
    return text_head(model, out, pool_index)


def text_length(model, tokens, truncate: bool | None = None) -> int:
    """How many tokens of ``tokens`` (C, L) the tower runs: up to the last pooled position where
    truncation is exact (one read-back of the pool positions), else all. ``truncate``: see
    ``_exact``."""
    if not _exact(truncate, text_truncation_off_reason, model):
        return tokens.shape[1]
    return truncated_length(text_pool_index(model, tokens).cpu(), tokens.shape[1])


def encode_text(model, tokens, prompt_embeddings=None, truncate: bool | None = None,
                prune_last: bool | None = None, policy=None, length: int | None = None):
    """Text features of ``tokens`` (C, L) through the whole tower, truncated to the longest prompt
    where that is exact (see the module docstring); ``prompt_embeddings`` replace the token
    embeddings (CoOp). ``length``: ``text_length`` of these tokens, when the caller kept it."""
    pool_index = text_pool_index(model, tokens)
    if length is None:
        length = text_length(model, tokens, truncate)
    emb = None if prompt_embeddings is None else prompt_embeddings[:, :length]
    x = text_embed(model, tokens[:, :length], emb)
    return encode_text_from(model, x, 0, pool_index, prune_last, policy)
