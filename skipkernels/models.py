"""Creating models: open_clip's (built-in names, the embedded tiny config, local or named weights)
and Hugging Face transformers' (``hf:<folder or hub name>``: CLIPModel, SiglipModel, Siglip2Model).
Also the reading of a run's model.pt that holds more than open_clip's weights (``read_tuned``; its
format and writer: ``skipkernels.train.export``)."""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

from skipkernels import distributed
from skipkernels._compat import import_open_clip, import_optional
from skipkernels.adapters.timm import register_tiny_trunks
from skipkernels.errors import CheckpointError

_registered = False
CONFIG_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = tuple(sorted(path.stem for path in CONFIG_DIR.glob("*.json")))
# The shipped configs' vocabulary (49,408) is open_clip's BPE tokenizer's. By name open_clip would
# give the *-siglip ones SigLIP's sentencepiece vocabulary, downloaded at every use.
SHIPPED_CONFIG_TOKENIZER = "ViT-B-16"
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

# Models whose weights ship with the package: they load by name unless ``pretrained`` says otherwise.
SHIPPED_WEIGHTS = {"skipkernels-tiny-shapes": Path(__file__).parent / "weights" / "skipkernels-tiny-shapes.safetensors"}
RANDOM_WEIGHTS = "none"  # pretrained="none" (--pretrained none): random weights, shipped ones or not


def resolve_pretrained(name: str, pretrained: str | None, say: bool = True) -> str | None:
    """The weights ``create_model`` loads: ``pretrained`` as given; None becomes the shipped weights
    of ``name`` where there are some (said on stderr when ``say``); "none" is None (random)."""
    if pretrained == RANDOM_WEIGHTS:
        return None
    if pretrained is None and name in SHIPPED_WEIGHTS:
        if say:
            print(f"{name}: the shipped pretrained weights ({SHIPPED_WEIGHTS[name]}); --pretrained none for random "
                  "weights", file=sys.stderr)
        return str(SHIPPED_WEIGHTS[name])
    return pretrained or None


def _register_shipped_configs(factory) -> None:
    """The shipped configs into open_clip's ``factory`` module, and their timm trunks, once."""
    global _registered
    if _registered:
        return
    factory.add_model_config(CONFIG_DIR)
    try:
        register_tiny_trunks()
    except ImportError:  # without timm only the open_clip ViT configs can be built
        pass
    _registered = True


def open_clip_module():
    """open_clip, with the shipped configs registered."""
    open_clip = import_open_clip()
    _register_shipped_configs(open_clip.factory)
    return open_clip


_OPEN_CLIP_FACTORY = "open_clip.factory"  # where open_clip keeps its model configs


class _RegisterOnOpenClipImport(importlib.abc.MetaPathFinder):
    """Registers the shipped configs right after open_clip's factory module has run. It waits for
    the factory, not the package: skipkernels may be imported while open_clip's package is only
    half imported (the torchvision shim of .ci/install imports skipkernels._compat)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _OPEN_CLIP_FACTORY:
            return None
        sys.meta_path.remove(self)  # once, and so that the other finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _register_shipped_configs(module)
        spec.loader.exec_module = exec_module
        return spec


def register_with_open_clip() -> None:
    """Make the shipped configs (``SHIPPED_CONFIGS``) known to open_clip, so that plain
    ``open_clip.create_model(name, pretrained="RUN/model.pt")`` builds them: now if open_clip is
    loaded, else as it is imported. ``import skipkernels`` calls it; importing open_clip here
    would add seconds to every command."""
    factory = sys.modules.get(_OPEN_CLIP_FACTORY)
    if factory is not None:
        if not getattr(factory.__spec__, "_initializing", False):
            _register_shipped_configs(factory)
    elif not any(isinstance(finder, _RegisterOnOpenClipImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnOpenClipImport())


def _is_weights_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith(WEIGHT_FILE_SUFFIXES) or os.path.isfile(pretrained)


def _unknown_weights(open_clip, name: str, pretrained: str) -> str:
    """Why ``pretrained`` names no weights of ``name``, and what to pass instead."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tags:
        known = f"open_clip's weights for {name} are {', '.join(tags)}"
    elif name in SHIPPED_WEIGHTS:
        known = f"open_clip has none for {name}; its shipped weights load when --pretrained is left out"
    else:
        known = f"no pretrained weights ship for {name}, with open_clip or skipkernels"
    return (f"could not load weights {pretrained!r} for {name}: no such file, and {known}. Pass a local checkpoint "
            f"file, or --pretrained {RANDOM_WEIGHTS} for random weights")


def create_model(name: str, pretrained: str | None = None, device="cpu", seed: int | None = 0,
                 tokenizer: str | None = None, **kwargs):
    """Returns (model, tokenizer). ``pretrained``: a local checkpoint path, an open_clip weight
    name (e.g. 'openai'; needs those weights to be reachable or cached), or None for random
    weights drawn with ``seed`` ("none": random even where the model has shipped weights; None: the
    shipped ones where there are some, see ``resolve_pretrained``). ``tokenizer``: see ``load_tokenizer``."""
    if name.startswith(HF_PREFIX):
        return create_hf_model(name.removeprefix(HF_PREFIX), pretrained, device, tokenizer, seed)
    open_clip = open_clip_module()
    pretrained = resolve_pretrained(name, pretrained)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models() "
                         f"(the configs shipped with skipkernels are {', '.join(SHIPPED_CONFIGS)})")
    if pretrained and not _is_weights_path(pretrained) and not open_clip.get_pretrained_cfg(name, pretrained):
        raise ValueError(_unknown_weights(open_clip, name, pretrained))
    if pretrained and _is_weights_path(pretrained):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained}")
        tuned = read_tuned(pretrained) if pretrained.endswith(".pt") else None
        if tuned is not None:
            raise CheckpointError(f"{pretrained} is a tuned {tuned['model']} with {tuned['skip_config']['mode']}'s "
                                  "modules, more than open_clip's weights: give it as --checkpoint (eval, predict) "
                                  "or to skipkernels.prediction.load_classifier(checkpoint=...)")
    if seed is not None:
        torch.manual_seed(seed)
    # every rank of a torchrun job builds the same model: open_clip's log lines ("initialized
    # randomly") once, from the main rank
    quiet = contextlib.nullcontext() if distributed.is_main() else logging_disabled(logging.WARNING)
    try:
        with quiet:
            model = open_clip.create_model(name, pretrained=pretrained or None, device=device, **kwargs)
    except (RuntimeError, AssertionError) as err:
        if pretrained and not os.path.isfile(pretrained):  # one of open_clip's, named: its download failed
            raise CheckpointError(f"could not download open_clip's weights {pretrained!r} for {name}: {err}. "
                                  "Without network access pass a local checkpoint path") from err
        # weights of another model (or not a model at all): a state_dict mismatch, or open_clip's
        # assertions on the shapes it resizes (e.g. "text pos_embed width changed!")
        if pretrained and ("state_dict" in str(err) or isinstance(err, AssertionError)):
            raise CheckpointError(f"{pretrained} does not hold weights of {name} (weights of another model?): "
                                  f"{str(err).splitlines()[-1].strip()[:300]}") from err
        raise
    return model, load_tokenizer(name, model, tokenizer)


@contextlib.contextmanager
def logging_disabled(level: int):
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


HF_PREFIX = "hf:"


def hf_config_and_class(source: str, hint: str = ""):
    """(transformers, the saved config of ``source``, its supported model class); ValueError, with
    ``hint`` appended, where the config cannot be read or its model type is not supported."""
    from skipkernels.adapters.transformers import model_class
    from skipkernels.families import HF_MODELS
    transformers = import_transformers(source)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read the transformers config of {source!r}: {err}.{hint}") from err
    cls = model_class(transformers, config.model_type)
    if cls is None:
        raise ValueError(f"{source!r} is a transformers {config.model_type!r} model; supported: {', '.join(HF_MODELS)}")
    return transformers, config, cls


def create_hf_model(source: str, pretrained: str | None = None, device="cpu", tokenizer: str | None = None,
                    seed: int | None = 0):
    """(model, tokenizer) of a Hugging Face CLIPModel, SiglipModel or Siglip2Model saved in folder
    ``source`` or named on the hub (``HF_HUB_OFFLINE=1`` reads only the local cache). Its own
    weights are loaded (``pretrained="none"``: its config with random weights; a state_dict file:
    those weights); the tokenizer is the folder's (or ``tokenizer``'s), padded to the model's text
    context. ``seed`` seeds torch's RNG first, as for open_clip models: random weights, and whatever
    is drawn after (PET modules' initial weights), are then the same in every process."""
    from skipkernels.families import token_function
    transformers, config, cls = hf_config_and_class(source, f" {_OFFLINE_HINT}")
    weights_file = pretrained not in (None, RANDOM_WEIGHTS) and os.path.isfile(pretrained)
    if pretrained not in (None, RANDOM_WEIGHTS) and not weights_file:
        raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained} (a transformers model loads its own "
                                "weights from its folder; pretrained may name a state_dict file of them)")
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(config) if pretrained == RANDOM_WEIGHTS or weights_file else cls.from_pretrained(source)
    if weights_file:  # a state_dict of this model, e.g. a finetune run's model.pt
        tuned = read_tuned(pretrained) if pretrained.endswith(".pt") else None
        if tuned is not None:
            raise CheckpointError(f"{pretrained} is a tuned {tuned['model']} with {tuned['skip_config']['mode']}'s "
                                  "modules: give it as --checkpoint (eval, predict)")
        load_state_dict(model, torch.load(pretrained, map_location="cpu", weights_only=True), pretrained, source)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer or source)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load the tokenizer of {tokenizer or source!r}: {err}. {_OFFLINE_HINT}") from err
    return model.to(device), token_function(tok, config.text_config.max_position_embeddings)


def import_transformers(source: str = "<folder or hub name>"):
    """transformers, which ``hf:`` models need; MissingDependency, saying how to install it, without it."""
    return import_optional("transformers", f"model {HF_PREFIX}{source}")


# model.pt holding more than open_clip's weights: a dict marked with this key and version.
FORMAT_KEY = "skipkernels_tuned_model"
FORMAT_VERSION = 1


def read_tuned(path) -> dict | None:
    """The dict of a model.pt that holds more than open_clip's weights (``train.export``); None for
    anything else (a plain state_dict, a safetensors file), which open_clip then loads or refuses."""
    try:  # mapped, to look: a plain state_dict's tensors are not read here
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours to read: open_clip's loading says what it is
        return None
    if not isinstance(state, dict) or FORMAT_KEY not in state:
        return None
    if state[FORMAT_KEY] != FORMAT_VERSION:
        raise CheckpointError(f"{path} is a tuned model of format {state[FORMAT_KEY]!r}; this version "
                              f"of skipkernels reads format {FORMAT_VERSION}")
    return torch.load(path, map_location="cpu", weights_only=True)  # in memory: the file may be replaced


def load_state_dict(model, state: dict, path, name: str) -> None:
    """``state`` into ``model``; a CheckpointError naming ``path`` where it holds another model's weights."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not hold weights of {name}: {str(err).splitlines()[-1].strip()[:300]}") \
            from err


def load_tokenizer(name: str, model, tokenizer: str | None = None):
    """The tokenizer for open_clip model ``name``, at the model's context length.

    ``tokenizer``: None for the model's own (SigLIP's comes from the Hugging Face hub or its local
    cache, e.g. with ``HF_HUB_OFFLINE=1``; the shipped configs' is open_clip's BPE tokenizer,
    ``SHIPPED_CONFIG_TOKENIZER``); a folder holding a Hugging Face tokenizer (or an
    open_clip hub snapshot with ``open_clip_config.json``); or an open_clip tokenizer name
    (``ViT-B-16`` for CLIP's own BPE tokenizer, ``hf-hub:org/repo``).
    """
    open_clip = open_clip_module()
    context = model.context_length
    source = tokenizer or (SHIPPED_CONFIG_TOKENIZER if name in SHIPPED_CONFIGS else name)
    if tokenizer and not os.path.isdir(tokenizer) and not tokenizer.startswith("hf-hub:") \
            and tokenizer not in open_clip.list_models():
        # open_clip would silently fall back to its BPE tokenizer for an unknown name
        raise ValueError(f"tokenizer {tokenizer!r} is neither a folder nor an open_clip model name nor hf-hub:ORG/REPO. "
                         f"{_OFFLINE_HINT}")
    try:
        if tokenizer and os.path.isdir(tokenizer):
            if os.path.isfile(os.path.join(tokenizer, "open_clip_config.json")):
                return open_clip.get_tokenizer(f"local-dir:{tokenizer}", context_length=context)
            from skipkernels.adapters.open_clip import folder_tokenizer
            kwargs = (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("tokenizer_kwargs", {})
            return folder_tokenizer(tokenizer, context, **kwargs)
        return open_clip.get_tokenizer(source, context_length=context)
    except (OSError, ValueError, ImportError) as err:
        raise ValueError(f"could not load the tokenizer {source!r} for {name}: {err}. {_OFFLINE_HINT}") from err


_OFFLINE_HINT = ("Without network access set HF_HUB_OFFLINE=1 and have the tokenizer in the Hugging Face cache, "
                 "or pass a tokenizer folder or an open_clip tokenizer name (--tokenizer)")
