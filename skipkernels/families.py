"""The open_clip model families skipkernels tunes, and where each keeps its towers' parts.

Image towers:
- open_clip ``VisionTransformer`` (OpenAI CLIP, LAION, DFN, MetaCLIP; ViT-B/L/H/bigG): stem (patch
  conv, class token, positional embedding, patch dropout, ln_pre), blocks, pool + ln_post, proj;
- a timm ``VisionTransformer`` or ``Eva`` trunk inside open_clip's ``TimmModel`` (SigLIP, SigLIP 2,
  EVA-02, ViTamin): stem (patch embed, which for ViTamin is a convolutional network, class /
  register tokens, positional embedding, patch dropout, norm_pre), blocks (Eva's with rotary
  embeddings, which depend only on the patch grid), norm, timm's pooling ('token', 'avg', or 'map'
  attention pooling) and head, then TimmModel's head.
Text towers: open_clip's own transformer, flattened into ``CLIP`` or as ``CustomTextCLIP.text``
(``TextTransformer``), with a causal mask or none.

Hugging Face ``transformers`` models: ``CLIPModel`` (image: embeddings, pre-norm, encoder layers,
the class token's post-norm, ``visual_projection``; text: causal, pooled at the first EOS) and
``SiglipModel`` (image: embeddings, encoder layers, post-norm, the attention-pooling head; text:
bidirectional, pooled at the last position, ``head``) and ``Siglip2Model`` (as SigLIP; its NaFlex
image embeddings take patchified pixels with their grid's shape: square images at the size whose
patch grid is the position-embedding grid are patchified here, as its image processor does),
their weights and names untouched.

Refused, with the reason: ResNet, ConvNeXt and hybrid image towers such as FastViT (their stages
are not one stack of token blocks, so there is no block omega to cache at), a convolutional stem
with BatchNorm, Hugging Face text towers inside open_clip models, CoCa.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# Pooling rules that read one token per prompt / image: last-block pruning is exact for them.
SINGLE_TOKEN_TEXT_POOLS = ("argmax", "eos", "first", "last")
# Text pooling at a position that depends on the prompt (not on the context length): truncation
# to the longest prompt is exact for them under a causal mask.
PROMPT_POSITION_TEXT_POOLS = ("argmax", "eos", "first")
_TIMM_TRUNKS = ("VisionTransformer", "Eva")
_HYBRID_HINTS = ("MobileCLIP", "FastViT", "MCi", "Hybrid")


class UnsupportedModel(TypeError):
    pass


# ------------------------------------------------------------------------------------ image
class OpenClipImageTower:
    """open_clip's VisionTransformer."""

    kind = "open_clip VisionTransformer"

    def __init__(self, visual):
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.prefix_tokens = 1  # the class token

    def stem(self, images):
        return self.visual._embeds(images)

    def block_kwargs(self) -> dict:
        return {}

    def head(self, x):
        """Pool, ln_post and project the last block's output ((B, L, D), or the pruned (B, 1, D))."""
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def pruning_off_reason(self) -> str | None:
        if getattr(self.visual, "attn_pool", None) is not None:
            return "the image tower pools with an attentional pooler"
        if self.visual.pool_type != "tok":
            return f"the image tower pools by {self.visual.pool_type!r}, not one token"
        return None

    def head_parameters(self):
        """Trainable under LSkip besides the blocks: ln_post, proj (and an attentional pooler)."""
        visual = self.visual
        modules = [visual.ln_post, getattr(visual, "attn_pool", None), getattr(visual, "attn_pool_contrastive", None)]
        params = [p for m in modules if m is not None for p in m.parameters()]
        return params + ([visual.proj] if isinstance(visual.proj, nn.Parameter) else [])

    def token_dropping_off_reason(self) -> str | None:
        return None

    def module_kwargs(self, x, causal: bool) -> dict:
        return _open_clip_module_kwargs(x, causal)

    def parameters(self):
        return self.visual.parameters()


def _open_clip_module_kwargs(x, causal: bool) -> dict:
    """Keyword arguments of an open_clip or timm block run as a module: the additive causal mask."""
    if not causal:
        return {}
    length = x.shape[1]
    return {"attn_mask": torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)}


class TimmImageTower:
    """A timm VisionTransformer / Eva trunk in open_clip's TimmModel."""

    def __init__(self, visual):
        self.visual = visual
        self.trunk = trunk = visual.trunk
        self.kind = f"timm {type(trunk).__name__}"
        self.blocks = trunk.blocks
        self.prefix_tokens = trunk.num_prefix_tokens  # class and register tokens
        self.rope = getattr(trunk, "rope", None)

    def stem(self, images):
        trunk = self.trunk
        x = trunk.patch_embed(images)
        x = trunk._pos_embed(x)
        if isinstance(x, tuple):  # Eva: (tokens, rotary embedding); the rotary part is block_kwargs'
            x = x[0]
        else:
            x = trunk.patch_drop(x)
        return trunk.norm_pre(x)

    def block_kwargs(self) -> dict:
        # Eva blocks take the rotary embedding of the patch grid (the same for every image).
        return {"rope": self.rope.get_embed()} if self.rope is not None else {}

    def head(self, x):
        x = self.trunk.forward_head(self.trunk.norm(x))
        return self.visual.head(x)

    def pruning_off_reason(self) -> str | None:
        trunk = self.trunk
        if getattr(trunk, "attn_pool", None) is not None:
            return "the image tower pools with attention ('map') over all tokens"
        if trunk.global_pool != "token" or trunk.num_prefix_tokens < 1:
            return f"the image tower pools by {trunk.global_pool!r}, not one token"
        return None

    def head_parameters(self):
        """Trainable under LSkip besides the blocks: norm, attention pool, fc_norm, head(s)."""
        trunk = self.trunk
        modules = [trunk.norm, getattr(trunk, "attn_pool", None), trunk.fc_norm, trunk.head, self.visual.head]
        return [p for m in modules if m is not None for p in m.parameters()]

    def token_dropping_off_reason(self) -> str | None:
        if self.rope is not None:
            return "rotary position embeddings are computed for the whole patch grid"
        return None

    def module_kwargs(self, x, causal: bool) -> dict:
        return _open_clip_module_kwargs(x, causal)

    def parameters(self):
        return self.visual.parameters()


def hf_image_size(vision_config) -> int:
    """The square image size a transformers vision config takes; for SigLIP 2's NaFlex towers, the
    size whose patch grid is its position-embedding grid."""
    size = getattr(vision_config, "image_size", None)
    if size is None:
        size = int(round(vision_config.num_patches ** 0.5)) * vision_config.patch_size
    return size[0] if isinstance(size, (tuple, list)) else size


class HFImageTower:
    """The vision transformer of a Hugging Face ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model``."""

    def __init__(self, model):
        vision = model.vision_model
        self.model, self.vision = model, vision
        self.kind = f"transformers {type(model).__name__} vision"
        self.blocks = vision.encoder.layers
        self.siglip = not hasattr(vision, "pre_layrnorm")  # CLIP's pre-norm (its name is transformers')
        self.naflex = type(model).__name__ == "Siglip2Model"
        self.patch_size = model.config.vision_config.patch_size
        self.prefix_tokens = 0 if self.siglip else 1  # CLIP's class token; SigLIP has none
        if self.siglip and not getattr(vision, "use_head", False):
            raise UnsupportedModel("SigLIP vision towers without their attention-pooling head "
                                   "(vision_use_head=False) give no image features")

    def stem(self, images):
        if self.naflex:
            return self.vision.embeddings(*self.patches(images))
        x = self.vision.embeddings(images)
        return x if self.siglip else self.vision.pre_layrnorm(x)

    def patches(self, images):
        """SigLIP 2's inputs of square images: (B, patches, P·P·C) in its image processor's order
        (rows of patches, each patch row by row, channels last), and the patch grid's shape."""
        batch, channels, height, width = images.shape
        p = self.patch_size
        grid = images.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        shapes = torch.tensor([[height // p, width // p]], device=images.device).expand(batch, 2)
        return grid.reshape(batch, (height // p) * (width // p), p * p * channels), shapes

    def block_kwargs(self) -> dict:
        return {}

    def head(self, x):
        vision = self.vision
        if self.naflex:
            return vision.head(vision.post_layernorm(x), None)  # every patch is valid: no mask
        if self.siglip:
            return vision.head(vision.post_layernorm(x))
        return self.model.visual_projection(vision.post_layernorm(x[:, 0]))

    def pruning_off_reason(self) -> str | None:
        if self.siglip:
            return "the image tower pools with attention ('map') over all tokens"
        return None

    def head_parameters(self):
        vision = self.vision
        modules = [vision.post_layernorm, vision.head] if self.siglip else \
            [vision.post_layernorm, self.model.visual_projection]
        return [p for m in modules for p in m.parameters()]

    def token_dropping_off_reason(self) -> str | None:
        return None

    def module_kwargs(self, x, causal: bool) -> dict:
        return {"attention_mask": None}

    def parameters(self):
        yield from self.vision.parameters()
        if not self.siglip:
            yield from self.model.visual_projection.parameters()


def image_tower(model):
    if is_hf_model(model):
        return model_towers(model)[0]
    visual = getattr(model, "visual", None)
    kind = type(visual).__name__
    if kind == "VisionTransformer":
        return OpenClipImageTower(visual)
    if kind == "TimmModel":
        trunk = type(visual.trunk).__name__
        if trunk not in _TIMM_TRUNKS or not hasattr(visual.trunk, "blocks"):
            if any(h.lower() in trunk.lower() for h in _HYBRID_HINTS):
                raise UnsupportedModel(_hybrid_message(f"timm {trunk}"))
            raise UnsupportedModel(f"the timm image trunk is {trunk}; only timm VisionTransformer and Eva trunks "
                                   "(SigLIP, EVA-02) are supported, not convolutional ones (ConvNeXt, ResNet): "
                                   "LSkip caches the tokens entering a transformer block")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in visual.trunk.patch_embed.modules()):
            # A convolutional stem is frozen and cached like any stem, but in train mode its BatchNorm
            # would normalise each cached batch differently from the model's own forward.
            raise UnsupportedModel(_hybrid_message(f"timm {trunk} with a BatchNorm convolutional stem"))
        if getattr(visual.trunk, "rope_mixed", False):
            raise UnsupportedModel("Eva trunks with per-block ('mixed') rotary embeddings are not supported")
        if getattr(visual.trunk, "rope", None) is not None and getattr(visual.trunk, "patch_drop", None) is not None:
            raise UnsupportedModel("patch dropout with rotary embeddings is not supported (the kept patches' "
                                   "rotary embeddings are not cached with them)")
        if getattr(visual.trunk, "dynamic_img_size", False):
            raise UnsupportedModel("timm trunks with dynamic image size are not supported")
        return TimmImageTower(visual)
    if kind == "ModifiedResNet":
        raise UnsupportedModel("the image tower is ModifiedResNet; only ViT image towers (open_clip "
                               "VisionTransformer, timm VisionTransformer / Eva) are supported, not ResNet or "
                               "ConvNeXt towers: LSkip caches the tokens entering a transformer block")
    if any(h.lower() in kind.lower() for h in _HYBRID_HINTS):
        raise UnsupportedModel(_hybrid_message(kind))
    raise UnsupportedModel(f"the image tower is {kind}; only ViT image towers (open_clip VisionTransformer, timm "
                           "VisionTransformer / Eva) are supported")


def _hybrid_message(what: str) -> str:
    return (f"the image tower is {what}, a hybrid convolution + attention network (e.g. MobileCLIP): its "
            "stages are not one stack of transformer blocks over a fixed token sequence, so LSkip has no block "
            "omega whose input tokens it could cache exactly")


# ------------------------------------------------------------------------------------- text
def _mask_kind(mask) -> str:
    """'none', 'causal' or 'custom' (the comparison is a device sync on a GPU: plans ask once)."""
    if mask is None:
        return "none"
    causal = torch.full(mask.shape, float("-inf"), device=mask.device, dtype=mask.dtype).triu_(1)
    return "causal" if mask.dim() == 2 and torch.equal(mask, causal) else "custom"


class TextTower:
    """open_clip's text transformer: ``holder`` is the CLIP model itself (its text parts are flattened
    into it) or CustomTextCLIP's ``text`` module; the part names are the same."""

    kind = "open_clip text transformer"

    def __init__(self, holder, pool_type: str, eos_id):
        self.holder = holder
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.blocks = holder.transformer.resblocks
        self.token_embedding = holder.token_embedding
        self.positional_embedding = holder.positional_embedding
        self.ln_final = holder.ln_final
        self.text_projection = holder.text_projection

    @property
    def mask_kind(self) -> str:
        return _mask_kind(self.holder.attn_mask)

    @property
    def causal(self) -> bool:
        return self.mask_kind == "causal"

    def cast_dtype(self):
        return self.holder.transformer.get_cast_dtype()

    def truncation_off_reason(self) -> str | None:
        if not self.causal:
            return "the text attention is not causal, so every token reaches the pooled one"
        if self.pool_type not in PROMPT_POSITION_TEXT_POOLS:
            return f"the text is pooled by {self.pool_type!r}, not at a position in the prompt"
        return None

    def pruning_off_reason(self) -> str | None:
        if self.pool_type not in SINGLE_TOKEN_TEXT_POOLS:
            return f"the text is pooled by {self.pool_type!r}, not one token"
        return None

    def head_parameters(self):
        params = list(self.ln_final.parameters())
        projection = self.text_projection
        if isinstance(projection, nn.Parameter):
            params.append(projection)
        elif isinstance(projection, nn.Module):
            params += list(projection.parameters())
        return params

    def module_kwargs(self, x, causal: bool) -> dict:
        return _open_clip_module_kwargs(x, causal)


class HFTextTower(TextTower):
    """The text transformer of a Hugging Face ``CLIPModel`` (causal, pooled at the first EOS, or
    at the largest id where the config's EOS id is the legacy 2), ``SiglipModel`` or
    ``Siglip2Model`` (bidirectional, pooled at the last position)."""

    def __init__(self, model):
        text = model.text_model
        self.holder = text
        self.kind = f"transformers {type(model).__name__} text"
        self.siglip = type(model).__name__ in ("SiglipModel", "Siglip2Model")
        self.blocks = text.encoder.layers
        self.token_embedding = text.embeddings.token_embedding
        self.ln_final = text.final_layer_norm
        if self.siglip:
            self.pool_type, self.eos_id, self.text_projection = "last", None, text.head
        else:
            eos = text.eos_token_id
            self.pool_type, self.eos_id = ("argmax", None) if eos == 2 else ("eos", eos)
            self.text_projection = model.text_projection

    @property
    def positional_embedding(self):
        return self.holder.embeddings.position_embedding.weight

    @property
    def mask_kind(self) -> str:
        return "none" if self.siglip else "causal"

    def cast_dtype(self):
        return self.token_embedding.weight.dtype

    def module_kwargs(self, x, causal: bool) -> dict:
        if not causal:
            return {"attention_mask": None}
        length = x.shape[1]
        mask = torch.full((length, length), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype).triu_(1)
        return {"attention_mask": mask[None, None]}


def text_tower(model) -> TextTower:
    if is_hf_model(model):
        return model_towers(model)[1]
    kind = type(model).__name__
    if kind == "CLIP" and hasattr(model, "token_embedding"):
        return TextTower(model, getattr(model, "text_pool_type", "argmax"), getattr(model, "text_eos_id", None))
    text = getattr(model, "text", None)
    if type(text).__name__ != "TextTransformer":
        raise UnsupportedModel(f"the text tower is {type(text).__name__}; only open_clip's own text transformer "
                               "is supported, not Hugging Face text towers")
    if getattr(text, "cls_emb", None) is not None:
        raise UnsupportedModel("text towers with an appended class token (CoCa style) are not supported")
    if getattr(text, "use_pad_mask", False):
        raise UnsupportedModel("text towers with a padding mask are not supported")
    return TextTower(text, text.pool_type, getattr(text, "eos_id", None))


# ------------------------------------------------------------------------------------ model
HF_MODELS = ("CLIPModel", "SiglipModel", "Siglip2Model")


def is_hf_model(model) -> bool:
    """A Hugging Face transformers model (its own config, ``save_pretrained``)."""
    return type(model).__module__.startswith("transformers.")


def model_towers(model):
    """(image tower, text tower) of a supported open_clip or Hugging Face model; a clear error otherwise."""
    kind = type(model).__name__
    if is_hf_model(model):
        if kind not in HF_MODELS:
            raise UnsupportedModel(f"the transformers model {kind} is not supported; supported: {', '.join(HF_MODELS)}")
        return HFImageTower(model), HFTextTower(model)
    if kind in ("CoCa",):
        raise UnsupportedModel("CoCa models are not supported: their text decoder and attentional pooler "
                               "differ from CLIP; use an open_clip CLIP model")
    if kind not in ("CLIP", "CustomTextCLIP") or not hasattr(model, "visual"):
        raise UnsupportedModel(f"expected an open_clip CLIP or CustomTextCLIP model, got {kind}")
    return image_tower(model), text_tower(model)


# ------------------------------------------------------------------------------- tokenizers
class PaddedTokens:
    """A Hugging Face tokenizer as the towers take it: texts -> LongTensor (C, context_length),
    padded to the context (how CLIP and SigLIP were trained; SigLIP needs it)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding="max_length", max_length=self.context_length, truncation=True,
                              return_tensors="pt")["input_ids"]


def _is_hf_tokenizer(tokenizer) -> bool:
    return type(tokenizer).__module__.startswith("transformers.") and hasattr(tokenizer, "pad_token_id")


def token_function(tokenizer, context_length: int):
    """What the towers call to tokenize: ``tokenizer`` itself where it maps texts to token ids (as
    open_clip's do), or a Hugging Face tokenizer or processor (its tokenizer) as ``PaddedTokens``."""
    if isinstance(tokenizer, PaddedTokens):
        return tokenizer
    for candidate in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        if candidate is not None and _is_hf_tokenizer(candidate):
            return PaddedTokens(candidate, context_length)
    return tokenizer
