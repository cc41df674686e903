"""The two CLIP towers as plans, built once, cut at a block index for LSkip's prefix and suffix.

``ModelPlan(model, policy)`` holds an ``ImagePlan`` and a ``TextPlan``: each tower's parts (found
once by ``skipkernels.families``), and per block a ``BlockPlan`` (the op each sub-layer runs, its
PET hooks) or, for a block the op layer does not compute, the block's own forward. A training step
runs loss -> tower plan -> block plan -> kernel and decides nothing again. A model holds one
``ModelPlan`` (``model_plan``): ``patch_clip`` routes the blocks' and encoders' forwards through it,
the tuner runs it, and whatever changes what the blocks run (``apply_pet``, ``PetHandle.remove`` /
``merge``, a new policy) calls its ``rebuild``, the one place the plans are built again. A plan
given no policy follows the ambient one, checked once per tower run.

Image: stem -> blocks -> pool + norm -> projection; text: token + positional embedding -> blocks
(causal, or bidirectional for SigLIP) -> final norm -> pool at the model's own pooling position ->
projection.

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

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from skipkernels.families import model_towers
from skipkernels.ops import policy as policies
from skipkernels.ops.block import (MODEL_PLAN_ATTRIBUTE, BlockParts, BlockPlan, held_plan, read_block,
                                   unsupported_reason)
from skipkernels.pet.hooks import block_hooks
from skipkernels.pet.layouts import own_forward
from skipkernels.skip.modes import default_skip_layers

TEXT_PAD_MULTIPLE = 8


def truncated_length(pool_index, context_length: int) -> int:
    """Smallest multiple of 8 covering every pooled position (capped at the context length)."""
    needed = int(pool_index.max()) + 1 if len(pool_index) else 1
    padded = -(-needed // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE
    return min(padded, context_length)


class TowerPlan:
    """A tower's blocks, each with its ``BlockPlan`` (``hooks`` None: the block holds PET modules the
    op layer would not apply and runs its own forward) or None (the op layer does not compute it)."""

    def __init__(self, tower, policy):
        self.tower = tower
        self.blocks = list(tower.blocks)
        self.plan_blocks(policy)

    def plan_blocks(self, policy) -> None:
        """Build every block's plan under ``policy`` from the modules the blocks hold now."""
        self.policy = policy
        plans = []
        for block in self.blocks:
            parts = read_block(block)  # the block's adapter reports its parts by role
            if not isinstance(parts, BlockParts):
                plans.append(None)  # the op layer does not compute it: it runs its own forward
                continue
            hooks = block_hooks(block, parts)
            plans.append(BlockPlan(block, policy, hooks, own_forward(block) if hooks is None else None, parts))
        self.plans = plans
        self.bound_policy = policies.resolve(policy)
        self.off_reasons = self.find_off_reasons()

    def follow_ambient(self) -> None:
        """Bind the blocks' ops again where the plan follows the ambient policy and it changed."""
        if self.policy is None:
            ambient = policies.current_policy()
            if ambient is not self.bound_policy:
                for plan in self.plans:
                    if plan is not None:
                        plan.bind(ambient)
                self.bound_policy = ambient

    def find_off_reasons(self) -> dict:
        """Why each exact saving does not apply to this tower, by name (None: it applies)."""
        return {"pruning": self.tower.pruning_off_reason() or self.last_block_off_reason()}

    def off_reason(self, saving: str) -> str | None:
        return self.off_reasons[saving]

    def pruning_off_reason(self) -> str | None:
        """Why last-block pruning does not apply to this tower (None: it applies)."""
        return self.off_reason("pruning")

    def __len__(self) -> int:
        return len(self.blocks)

    def module_kwargs(self, x, causal: bool) -> dict:
        """Keyword arguments of the blocks that run their own forward (the family's mask)."""
        return self.tower.module_kwargs(x, causal)

    def run(self, x, start: int, stop: int, causal: bool = False, prune_index=None):
        """Blocks [start, stop): the op layer's plan for each block it computes, the others through
        their own forward. With ``prune_index`` the last block computes only those rows; one that
        cannot be pruned exactly runs in full and the rows are taken after it."""
        self.follow_ambient()
        module_kwargs = None
        for i in range(start, stop):
            plan = self.plans[i]
            index = prune_index if i == stop - 1 else None
            if plan is not None and plan.hooks is not None:
                pruned = index if plan.hooks.row_wise else None
                x = plan.forward(x, causal, None, pruned)
                if pruned is not None:
                    continue
            else:
                if module_kwargs is None:
                    module_kwargs = self.module_kwargs(x, causal)
                x = self.blocks[i](x, **module_kwargs)
            if index is not None:
                x = x[torch.arange(x.shape[0], device=x.device), index].unsqueeze(1)
        return x

    def last_block_off_reason(self) -> str | None:
        if not self.plans:
            return None
        plan = self.plans[-1]
        if plan is None or plan.hooks is None:
            return f"the last block ({type(self.blocks[-1]).__name__}) runs its own forward"
        if not plan.hooks.row_wise:
            return "a PET module of the last block reads every token (VL-PET's small gate)"
        return None

    def describe(self) -> list[str]:
        """One line per run of equal blocks: what each sub-layer runs."""
        lines, previous, first = [], None, 0
        described = [plan.describe() if plan is not None and plan.hooks is not None else {
            "block": type(block).__name__,
            "runs": f"its own forward ({unsupported_reason(block) or 'PET modules the op layer would not apply'})"}
            for block, plan in zip(self.blocks, self.plans)]
        for i, entry in enumerate(described + [None]):
            if entry != previous:
                if previous is not None:
                    span = f"block {first}" if i - 1 == first else f"blocks {first}-{i - 1}"
                    lines.append(f"{span} ({previous.pop('block')}):")
                    lines += [f"  {k}: {v}" for k, v in previous.items()]
                previous, first = entry, i
        return lines


class ImagePlan(TowerPlan):
    """The image tower: stem, blocks, pool + norm + projection (``families`` image towers)."""

    def __init__(self, tower, policy):
        super().__init__(tower, policy)
        self._block_kwargs, self._kwargs_device = None, None

    def module_kwargs(self, x, causal: bool) -> dict:
        # Eva blocks take the rotary embedding of the patch grid: the same for every image, so it
        # is computed once per device.
        if self._kwargs_device != x.device:
            self._block_kwargs, self._kwargs_device = self.tower.block_kwargs(), x.device
        return {**super().module_kwargs(x, causal), **self._block_kwargs}

    def stem(self, images):
        return self.tower.stem(images)

    def head(self, x):
        """Pool, norm and project the output of the last block ((B, L, D) or the pruned (B, 1, D))."""
        return self.tower.head(x)

    def blocks_between(self, x, start: int, stop: int, prune_last: bool | None = False):
        """Blocks [start, stop); LSkip's prefix is [0, skip_layers), its suffix [skip_layers, L).
        ``prune_last``: None asks ``pruning_off_reason``; True or False is a caller's answer to that
        same question, decided once (SkipTuner.savings) instead of on every step."""
        if stop <= start:
            return x
        prune = None
        if prune_last is None:
            prune_last = self.pruning_off_reason() is None
        if stop == len(self.blocks) and prune_last:
            prune = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # CLS row
        return self.run(x, start, stop, prune_index=prune)

    def encode_from(self, x, start: int, prune_last: bool | None = None):
        """Image features from the tokens entering block ``start`` (ω from LSkip)."""
        return self.head(self.blocks_between(x, start, len(self.blocks), prune_last))

    def encode(self, images, prune_last: bool | None = None):
        """Image features of ``images`` through the whole tower."""
        return self.encode_from(self.stem(images), 0, prune_last)


class TextPlan(TowerPlan):
    """The text tower: embedding, blocks (causal or not), final norm, pooling and projection."""

    def __init__(self, tower, policy):
        self.mask_kind = tower.mask_kind
        self.causal = self.mask_kind == "causal"
        self.token_embedding = tower.token_embedding
        self.context_length = tower.positional_embedding.shape[0]
        super().__init__(tower, policy)

    def find_off_reasons(self) -> dict:
        reason = self.tower.truncation_off_reason()
        if reason is None:
            for plan in self.plans:
                if plan is not None and plan.hooks is None:
                    reason = "a text block holds PET modules that run in its own forward"
                    break
                if plan is not None and not plan.hooks.row_wise:
                    reason = "a PET module of the text tower reads every token (VL-PET's small gate)"
                    break
        return {**super().find_off_reasons(), "truncation": reason}

    def truncation_off_reason(self) -> str | None:
        """Why text truncation does not apply (None: it applies)."""
        return self.off_reason("truncation")

    def pool_index(self, tokens) -> torch.Tensor:
        """Position each prompt is pooled at, by the model's own rule (not a blanket argmax)."""
        text = self.tower
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

    def embed(self, tokens, prompt_embeddings=None):
        """Token + positional embedding of ``tokens`` (C, T); ``prompt_embeddings`` replaces the
        token embeddings when given (CoOp's learned context)."""
        text = self.tower
        cast_dtype = text.cast_dtype()
        x = text.token_embedding(tokens) if prompt_embeddings is None else prompt_embeddings
        x = x.to(cast_dtype)
        return x + text.positional_embedding[: tokens.shape[1]].to(cast_dtype)

    def blocks_between(self, x, start: int, stop: int, pool_index=None):
        """Blocks [start, stop); with ``pool_index`` and ``stop`` = depth the last is pruned."""
        if stop <= start:
            return x
        prune = pool_index if (pool_index is not None and stop == len(self.blocks)) else None
        return self.run(x, start, stop, causal=self.causal, prune_index=prune)

    def head(self, x, pool_index):
        """Final norm, pool and project; ``x`` is (C, T, D) or the pruned (C, 1, D)."""
        text = self.tower
        if x.shape[1] == 1:  # pruned last block (or a one-token prompt): the row is the pooled token
            pooled = text.ln_final(x[:, 0])
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            pooled = text.ln_final(x[rows, pool_index])
        projection = text.text_projection
        if projection is not None:
            pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return pooled

    def encode_from(self, x, start: int, pool_index, prune_last: bool | None = None):
        """Text features from the tokens entering block ``start`` (ω from LSkip)."""
        if prune_last is None:
            prune_last = self.pruning_off_reason() is None
        out = self.blocks_between(x, start, len(self.blocks), pool_index if prune_last else None)
        return self.head(out, pool_index)

    def length(self, tokens, truncate: bool | None = None) -> int:
        """How many tokens of ``tokens`` (C, L) the tower runs: up to the last pooled position where
        truncation is exact (one read-back of the pool positions), else all."""
        if truncate is None:
            truncate = self.truncation_off_reason() is None
        if not truncate:
            return tokens.shape[1]
        return truncated_length(self.pool_index(tokens).cpu(), tokens.shape[1])

    def encode(self, tokens, prompt_embeddings=None, truncate: bool | None = None,
               prune_last: bool | None = None, length: int | None = None):
        """Text features of ``tokens`` (C, L) through the whole tower, truncated to the longest
        prompt where that is exact; ``prompt_embeddings`` replace the token embeddings (CoOp).
        ``length``: ``length(tokens)``, when the caller kept it."""
        pool_index = self.pool_index(tokens)
        if length is None:
            length = self.length(tokens, truncate)
        emb = None if prompt_embeddings is None else prompt_embeddings[:, :length]
        x = self.embed(tokens[:, :length], emb)
        return self.encode_from(x, 0, pool_index, prune_last)


# ``ModelPlan.rebuild``'s default: keep the plan's policy.
KEEP_POLICY = object()


class ModelPlan:
    """Both towers of a supported model, planned under ``policy`` (a KernelPolicy, a backend name,
    or None for the ambient one). A clear error for an unsupported model. ``model_plan(model)`` is
    the one the model holds; one built directly (``ModelPlan(model)``) only describes the model."""

    def __init__(self, model, policy=None):
        self.model = model
        self.routes_blocks = False  # patch_clip routes the blocks' forwards through this plan
        self.build(policy)

    def __deepcopy__(self, memo):
        # A deep-copied model holds a copy of its plan over the copied modules (what __reduce__
        # below would otherwise drop).
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def __reduce__(self):
        # A pickled model (torch.save(model)) leaves its plan behind: bound ops do not pickle, and
        # hold_plan builds a plan again where one is needed.
        return _no_plan, ()

    def build(self, policy) -> None:
        """Find the towers and plan every block under ``policy``, from the model as it is now."""
        image, text = model_towers(self.model)
        self.policy = policy
        self.image = ImagePlan(image, policy)
        self.text = TextPlan(text, policy)

    @property
    def text_mask(self) -> str:
        """'causal', 'none' or 'custom': with a custom mask the blocks still run their plans as
        modules, but the text tower is not run by this plan (``model_plan`` refuses to tune it)."""
        return self.text.mask_kind

    def rebuild(self, policy=KEEP_POLICY, towers: bool = False) -> None:
        """Build the block plans again: the blocks' PET modules changed (``apply_pet``,
        ``PetHandle.remove`` / ``merge``) or, given one, the policy did; the tower plans stay the
        same objects (a tuner's caches keep them). ``towers``: find the towers again too (the model
        may have changed: ``hold_plan``). Blocks ``patch_clip`` routed are routed through the new
        block plans."""
        policy = self.policy if policy is KEEP_POLICY else policy
        if towers:
            self.build(policy)
        else:
            self.policy = policy
            self.image.plan_blocks(policy)
            self.text.plan_blocks(policy)
        if self.routes_blocks:
            self.route_blocks()

    def follow_ambient(self) -> None:
        """Bind both towers' ops under the ambient policy now, where the plan follows it: a compiled
        or captured step calls this first, so no op is bound (reading the measured table) inside
        its trace."""
        self.image.follow_ambient()
        self.text.follow_ambient()

    def route_blocks(self) -> None:
        """Set the forward of every block the op layer computes to its plan's (``patch_clip``)."""
        self.routes_blocks = True
        for tower in (self.image, self.text):
            for block, plan in zip(tower.blocks, tower.plans):
                if plan is not None:
                    block.forward = plan.as_forward()

    def default_skip_layers(self) -> tuple[int, str]:
        """The default ω for this model and why (``skip.modes.default_skip_layers``)."""
        return default_skip_layers(len(self.image), len(self.text))

    def check_skip_layers(self, skip_layers: int) -> None:
        depth = min(len(self.image), len(self.text))
        if not isinstance(skip_layers, int) or isinstance(skip_layers, bool):
            raise TypeError(f"skip_layers must be an int, got {type(skip_layers).__name__}")
        if not 0 <= skip_layers < depth:
            raise ValueError(f"skip_layers must be in [0, {depth}) for this model (image tower "
                             f"{len(self.image)} blocks, text tower {len(self.text)} blocks), got {skip_layers}")

    def describe(self) -> str:
        lines = []
        for name, tower in (("image", self.image), ("text", self.text)):
            lines.append(f"{name} tower ({tower.tower.kind}, {len(tower)} blocks):")
            lines += [f"  {line}" for line in tower.describe()]
        return "\n".join(lines)

    # patch_clip rebinds the model's encode_image / encode_text to these
    def encode_image(self, image, normalize: bool = False):
        features = self.image.encode(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize: bool = False):
        # Exact savings, each only where it is exact: causal attention pooled at one position per
        # prompt runs only up to the last pooled position; the last block computes only the pooled row.
        features = self.text.encode(text)
        return F.normalize(features, dim=-1) if normalize else features


def _no_plan():
    return None


def hold_plan(model: nn.Module, policy=None) -> ModelPlan:
    """The one plan ``model`` holds, built under ``policy`` from the model as it is now (its towers
    found again: modules may have been replaced since). The same object where the model held one,
    so what was routed through it (``patch_clip``) stays routed."""
    plan = held_plan(model)
    if plan is None:
        plan = ModelPlan(model, policy)
        model.__dict__[MODEL_PLAN_ATTRIBUTE] = plan  # a plain attribute: no module, parameter or state
    else:
        plan.rebuild(policy, towers=True)
    return plan


def model_plan(model: nn.Module, policy=None) -> ModelPlan:
    """The model's plan for a tuner (``hold_plan``); a ValueError where its text tower cannot run on it."""
    plan = hold_plan(model, policy)
    if plan.text_mask == "custom":
        raise ValueError("text attention masks other than causal or none are not supported")
    return plan


def model_policy(model: nn.Module):
    """The policy of the plan ``model`` holds (given to ``patch_clip`` or a tuner); None: the
    ambient one, or no plan."""
    plan = held_plan(model)
    return plan.policy if plan is not None else None
