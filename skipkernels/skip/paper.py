"""The paper's Skip Tuning step as its code computes it, on plain open_clip modules in eager PyTorch.

This is the baseline every speed ratio is taken against (``skipkernels bench --modes paper``). It
is written from the algorithm's description, not from ``SkipTuner``, and uses none of the
package's ops or savings:

- LSkip: the frozen prefix of each tower (stem, blocks [0, omega)) runs once without autograd;
  the text prompts' tokens at block omega are cached for the run, the images' per batch
  (``image_prefix``, as the paper caches them per epoch);
- every selected class runs the full 77-token prompt through text blocks [omega, L) with the
  model's own causal mask, and every image token through the last image block (no truncation,
  no pruning);
- CSkip: scores against frozen zero-shot prototypes (the pretrained model's normalised text
  features), labels forced in, top K ranks plus the ranks a fixed random mask keeps, classes
  sorted, labels remapped;
- logits = exp(logit_scale) * cos (+ logit_bias where the model has one), cross-entropy.

Trainable: blocks [omega, L) of both towers, ln_post, proj, ln_final, text_projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from skipkernels._compat import import_open_clip
from skipkernels.adapters import is_paper_model

text_global_pool = import_open_clip().transformer.text_global_pool


def _keep_probabilities(count: int, lam: float) -> torch.Tensor:
    """Min-max normalised exponential pdf (scale lam) at linspace(0, 5, count): 1 first, 0 last.
    A lone position is the first lower rank, always kept: 1 (docs/DEPARTURES.md)."""
    if count <= 1:
        return torch.ones(count, dtype=torch.float64)
    x = torch.linspace(0.0, 5.0, count, dtype=torch.float64)
    pdf = torch.exp(-x / lam) / lam
    return (pdf - pdf.min()) / (pdf.max() - pdf.min())


class UnsupportedPaperModel(ValueError):
    pass


class PaperSkipTuning(nn.Module):
    """``loss(image_tokens, labels)`` of one step; ``image_prefix(images)`` gives the tokens."""

    def __init__(self, model, classnames, tokenizer, skip_layers: int | None = None, top_ratio: float = 0.5,
                 max_top: int = 50, lam: float = 0.3, template: str = "a photo of a {}.", seed: int = 0,
                 rank_mask: torch.Tensor | None = None, top_count: int | None = None):
        super().__init__()
        if not is_paper_model(model):
            raise UnsupportedPaperModel(
                f"the paper-style step runs open_clip CLIP models with their own ViT image tower (the "
                f"paper's models), not {type(model).__name__}"
                + (f" with {type(model.visual).__name__}" if hasattr(model, "visual") else ""))
        self.model = model
        if skip_layers is None:  # the paper's proportion: half the blocks (6 of ViT-B/16's 12)
            skip_layers = min(len(model.visual.transformer.resblocks), len(model.transformer.resblocks)) // 2
        self.skip_layers = skip_layers
        self.device = next(model.parameters()).device
        self.cache_dtype = torch.float32
        visual = model.visual
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = [*visual.transformer.resblocks[skip_layers:], *model.transformer.resblocks[skip_layers:],
                     visual.ln_post, model.ln_final]
        for module in trainable:
            for p in module.parameters():
                p.requires_grad_(True)
        for projection in (visual.proj, model.text_projection):  # a Parameter or an nn.Linear
            if projection is not None:
                projection.requires_grad_(True)

        tokens = tokenizer([template.format(c) for c in classnames]).to(self.device)
        self.tokens = tokens
        with torch.no_grad():
            self.prototypes = F.normalize(model.encode_text(tokens), dim=-1).float()
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
            for block in model.transformer.resblocks[:skip_layers]:
                x = block(x, attn_mask=model.attn_mask)
            self.text_tokens = x  # (C, 77, D) at block omega, for the whole run

        num_classes = len(classnames)
        # The authors' count (select_classes): a ratio up to 1, a count above; max_top caps both;
        # r == 1.0 or K == C runs every class. top_count, where given, is that count spelled as one.
        if top_count is not None:
            if top_count < 1:
                raise ValueError(f"top_count must be >= 1, got {top_count}")
            self.top_k = int(min(top_count, num_classes, max_top))
        else:
            top_k = math.ceil(top_ratio * num_classes) if top_ratio <= 1.0 else math.ceil(min(top_ratio, num_classes))
            self.top_k = num_classes if top_ratio == 1.0 else int(min(top_k, max_top))
        if rank_mask is None:
            gen = torch.Generator().manual_seed(seed)
            probs = _keep_probabilities(num_classes - self.top_k, lam)
            rank_mask = torch.rand(probs.shape, generator=gen, dtype=torch.float64) < probs
        self.rank_mask = rank_mask.to(self.device)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def image_prefix(self, images):
        visual = self.model.visual
        x = visual._embeds(images)
        for block in visual.transformer.resblocks[:self.skip_layers]:
            x = block(x)
        return x

    def parameter_groups(self, lr: float, lr_image: float | None = None, weight_decay: float = 5e-4):
        visual = {id(p) for p in self.model.visual.parameters()}
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        image = [p for p in trainable if id(p) in visual]
        text = [p for p in trainable if id(p) not in visual]
        return [{"params": text, "lr": lr, "weight_decay": weight_decay},
                {"params": image, "lr": lr if lr_image is None else lr_image, "weight_decay": weight_decay}]

    @torch.no_grad()
    def select_classes(self, image_features, labels):
        """(selected class indices ascending, labels remapped into them)."""
        scores = (F.normalize(image_features.float(), dim=-1) @ self.prototypes.T).amax(dim=0)
        scores[labels] = float("inf")
        order = torch.sort(scores, descending=True, stable=True).indices
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[order[:self.top_k]] = True
        keep[order[self.top_k:][self.rank_mask]] = True
        keep[labels] = True
        selected = keep.nonzero().flatten()
        return selected, torch.searchsorted(selected, labels)

    def loss(self, image_tokens, labels):
        model, visual = self.model, self.model.visual
        x = image_tokens
        for block in visual.transformer.resblocks[self.skip_layers:]:
            x = block(x)
        pooled, _ = visual._pool(x)
        f = pooled @ visual.proj if visual.proj is not None else pooled

        selected, targets = self.select_classes(f, labels)
        t = self.text_tokens[selected]
        for block in model.transformer.resblocks[self.skip_layers:]:
            t = block(t, attn_mask=model.attn_mask)
        t = text_global_pool(model.ln_final(t), self.tokens[selected], model.text_pool_type,
                             eos_token_id=getattr(model, "text_eos_id", None))
        projection = model.text_projection
        if projection is not None:
            t = projection(t) if isinstance(projection, nn.Linear) else t @ projection

        logits = model.logit_scale.exp() * F.normalize(f, dim=-1) @ F.normalize(t, dim=-1).T
        if getattr(model, "logit_bias", None) is not None:
            logits = logits + model.logit_bias
        self.last_selected, self.last_labels = selected, targets
        return F.cross_entropy(logits, targets)
