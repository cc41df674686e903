"""Hugging Face transformers: ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` (towers, encoder
layers, tokenizers), and the encoder-decoders PET applies to (BART layers, T5 blocks).

``CLIPModel``: image: embeddings, pre-norm, encoder layers, the class token's post-norm,
``visual_projection``; text: causal, pooled at the first EOS. ``SiglipModel``: image: embeddings,
encoder layers, post-norm, the attention-pooling head; text: bidirectional, pooled at the last
position, ``head``. ``Siglip2Model``: as SigLIP; its NaFlex image embeddings take patchified pixels
with their grid's shape: square images at the size whose patch grid is the position-embedding grid
are patchified here, as its image processor does. Weights and names stay untouched.

Encoder layers (``CLIPEncoderLayer``, ``SiglipEncoderLayer``, ``Siglip2EncoderLayer``): separate
q, k, v projections, which the op layer reads as one packed projection (so LoRA on them is
weight-level); under PET they run the op layer's plan with the modules as hooks.

PET on encoder-decoders:
- ``bart``: BART layers (post-norm). attn: X = the q-projection's input (the layer input), H =
  ``out_proj``'s output; mlp: X = ``fc1``'s input, H = ``fc2``'s output; cross: X =
  ``encoder_attn.q_proj``'s input, H = ``encoder_attn.out_proj``'s, value ``encoder_attn.v_proj``.
- ``t5``: T5 blocks (pre-norm). X = the input of ``T5LayerSelfAttention`` /
  ``T5LayerCrossAttention`` / ``T5LayerFF`` (the residual stream before their norm), H = the output
  of ``o`` / ``o`` / ``DenseReluDense.wo``; value ``EncDecAttention.v``.
In these layers the host adds the residual (after its dropout), so the modifier rewrites H into
s · G ⊙ (H + ΔH) with a forward hook and the host computes X + that.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from skipkernels.adapters.base import PetBlock, SubLayer, UnsupportedModel, gelu_name
from skipkernels.adapters.open_clip import TextTower
from skipkernels.ops.block import BlockParts, PackedProjections

MODELS = ("CLIPModel", "SiglipModel", "Siglip2Model")
LAYERS = ("CLIPEncoderLayer", "SiglipEncoderLayer", "Siglip2EncoderLayer")
ATTENTIONS = ("CLIPAttention", "SiglipAttention", "Siglip2Attention")
# Post-norm BART-style layers: the FFN's residual is fc1's input. Pre-norm relatives (mBART,
# Whisper, ...) keep the residual before their final norm and need a layout of their own.
BART_LAYERS = ("BartEncoderLayer", "BartDecoderLayer")
# transformers' activation modules (ACT2FN) that compute one of the op layer's activations.
_ACTIVATIONS = {"QuickGELUActivation": "quick_gelu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                "PytorchGELUTanh": "gelu_tanh"}


_MODEL_OF_TYPE = dict(zip(("clip", "siglip", "siglip2"), MODELS))  # a config's model_type: its model class


def model_class(transformers, model_type: str):
    """transformers' model class for a saved config's ``model_type``, or None if not supported."""
    name = _MODEL_OF_TYPE.get(model_type)
    return None if name is None else getattr(transformers, name)


def _kind(module) -> str:
    return type(module).__name__


def is_transformers(module) -> bool:
    """A Hugging Face transformers object (its own config, ``save_pretrained``)."""
    return type(module).__module__.startswith("transformers.")


def is_layer(module) -> bool:
    """A CLIP / SigLIP / SigLIP 2 encoder layer."""
    return _kind(module) in LAYERS and is_transformers(module)


def activation_name(module) -> str | None:
    """The op layer's name of a transformers activation module, or None."""
    name = gelu_name(module)
    if name is not None or not is_transformers(module):
        return name
    if _kind(module) == "GELUActivation" and getattr(module, "act", None) is not F.gelu:
        return None  # transformers' Python GELU (use_gelu_python)
    return _ACTIVATIONS.get(_kind(module))


# ------------------------------------------------------------------------------------ blocks
def read_block(block):
    """``BlockParts`` of a CLIP / SigLIP encoder layer, why the op layer does not compute it, or
    None (not such a layer)."""
    if not is_layer(block):
        return None
    attn, mlp = block.self_attn, block.mlp
    if _kind(attn) not in ATTENTIONS:
        return f"transformers attention {_kind(attn)}"
    act = activation_name(mlp.activation_fn)
    if act is None:
        return f"MLP activation {_kind(mlp.activation_fn)}"
    return BlockParts(block.layer_norm1, PackedProjections(attn.q_proj, attn.k_proj, attn.v_proj),
                      ("weight", "bias"), attn.out_proj, attn.num_heads, attn.dropout, None, None, None, None, None,
                      None, block.layer_norm2, mlp.fc1, mlp.activation_fn, None, mlp.fc2, None, act, "hidden_states")


# ----------------------------------------------------------------------- PET: where modules attach
def pet_block(name, module):
    """PET attach points of an encoder layer, a BART layer or a T5 block; None for anything else."""
    if is_layer(module):
        attn = module.self_attn
        return PetBlock(name, module, -1, "clip", module.mlp.fc1.in_features, is_decoder=False,
                        sublayers={"attn": SubLayer("attn"), "mlp": SubLayer("mlp")}, runs_plan=True,
                        weight_read=(attn.q_proj, attn.k_proj, attn.v_proj))
    if _kind(module) in BART_LAYERS:
        return _bart_layer(name, module)
    return _t5_block(name, module)


def _bart_layer(name, module):
    subs = {"attn": SubLayer("attn", module.self_attn.out_proj, module.self_attn.q_proj),
            "mlp": SubLayer("mlp", module.fc2, module.fc1)}
    cross = getattr(module, "encoder_attn", None)
    if cross is not None:
        subs["cross"] = SubLayer("cross", cross.out_proj, cross.q_proj, cross.v_proj)
    return PetBlock(name, module, -1, "bart", module.fc1.in_features, is_decoder=cross is not None, sublayers=subs)


def _t5_block(name, module):
    layers = getattr(module, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        return None
    first, last = layers[0], layers[-1]
    if not hasattr(first, "SelfAttention") or not hasattr(last, "DenseReluDense"):
        return None
    wo = last.DenseReluDense.wo
    subs = {"attn": SubLayer("attn", first.SelfAttention.o, first),
            "mlp": SubLayer("mlp", wo, last)}
    is_decoder = len(layers) == 3 and hasattr(layers[1], "EncDecAttention")
    if is_decoder:
        cross = layers[1]
        subs["cross"] = SubLayer("cross", cross.EncDecAttention.o, cross, cross.EncDecAttention.v)
    return PetBlock(name, module, -1, "t5", wo.out_features, is_decoder=is_decoder, sublayers=subs)


# ------------------------------------------------------------------------------------ towers
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
        self.kind = f"transformers {_kind(model)} vision"
        self.blocks = vision.encoder.layers
        self.siglip = not hasattr(vision, "pre_layrnorm")  # CLIP's pre-norm (its name is transformers')
        self.naflex = _kind(model) == "Siglip2Model"
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


class HFTextTower(TextTower):
    """The text transformer of a Hugging Face ``CLIPModel`` (causal, pooled at the first EOS, or
    at the largest id where the config's EOS id is the legacy 2), ``SiglipModel`` or
    ``Siglip2Model`` (bidirectional, pooled at the last position)."""

    def __init__(self, model):
        text = model.text_model
        self.holder = text
        self.kind = f"transformers {_kind(model)} text"
        self.siglip = _kind(model) in ("SiglipModel", "Siglip2Model")
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


def model_towers(model):
    """(image tower, text tower) of a supported transformers model; a clear error otherwise."""
    kind = _kind(model)
    if kind not in MODELS:
        raise UnsupportedModel(f"the transformers model {kind} is not supported; supported: {', '.join(MODELS)}")
    return HFImageTower(model), HFTextTower(model)


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
    return is_transformers(tokenizer) and hasattr(tokenizer, "pad_token_id")


def token_function(tokenizer, context_length: int):
    """What the towers call to tokenize: ``tokenizer`` itself where it maps texts to token ids (as
    open_clip's do), or a Hugging Face tokenizer or processor (its tokenizer) as ``PaddedTokens``."""
    if isinstance(tokenizer, PaddedTokens):
        return tokenizer
    for candidate in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        if candidate is not None and _is_hf_tokenizer(candidate):
            return PaddedTokens(candidate, context_length)
    return tokenizer
