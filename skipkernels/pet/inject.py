"""apply_pet: inject VL-PET / Adapter / LoRA modules into a model, freeze the rest, undo cleanly.

    handle = apply_pet(model, VLPETConfig("large", skip_layers=6))
    optimizer = torch.optim.SGD(handle.parameters(), lr=...)
    ...
    handle.merge()    # LoRA only: fold into the weights, leaving the plain model
    handle.remove()   # any method: the original model, exactly (weights, keys, requires_grad)

What goes where (the adapters report the attach points of each family; ``skipkernels.pet.layouts``):
- ``vlpet-*``: a ``VLPETModifier`` on each chosen sub-layer (default ``attn`` and ``mlp``) of
  every encoder block with index ≥ ``skip_layers``. In encoder-decoders the decoder blocks get
  the paper's lightweight design instead (``decoder="value_adapter"``): a parallel adapter on
  the cross-attention value projection, no gate.
- ``adapter``: a ``HoulsbyAdapter`` on each chosen sub-layer of every block (decoders too).
- ``lora``: LoRA factors on the chosen projections (default q, k, v) of every block.
Pre-trained tensors are never modified (until ``merge``) and keep their parameter names; PET
parameters are new children (``pet_attn``, ``pet_mlp``, ``lora``, ``lora_in_proj_weight``,
``pet_value_adapter``), listed by ``handle.pet_state_dict()``; ``handle.base_state_dict()`` is
the model's state_dict without them, key for key the original.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterator

import torch
import torch.nn as nn

from skipkernels.pet import layouts as L
from skipkernels.pet import modules as M
from skipkernels.pet.config import LORA_ALIASES, AdapterConfig, LoRAConfig, PetConfig, VLPETConfig
from skipkernels.pet.hooks import has_pet


class PetHandle:
    """The injected modules of one ``apply_pet`` call, and how to undo them."""

    def __init__(self, model: nn.Module, config: PetConfig):
        self.model = model
        self.config = config
        self.modules: dict[str, nn.Module] = {}   # qualified name -> PET module
        self._undo: list[Callable] = []
        self._lora_undo: list[Callable[[bool], None]] = []
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._base_keys: list[str] = []
        self._clip_forwards: dict[str, nn.Module] = {}  # blocks whose forward PET takes over
        self.active = True

    # -- parameters --------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable parameters (PET modules and ``train_extra`` matches)."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def pet_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules.values():
            yield from module.parameters()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_pet(self) -> int:
        return sum(p.numel() for p in self.pet_parameters())

    # -- state -------------------------------------------------------------------------------
    def base_state_dict(self) -> dict:
        """The model's state_dict without PET tensors: the original keys, in the original order."""
        state = self.model.state_dict()
        return {k: state[k] for k in self._base_keys}

    def pet_state_dict(self) -> dict:
        keys = set(self._base_keys)
        return {k: v for k, v in self.model.state_dict().items() if k not in keys}

    def load_pet_state_dict(self, state: dict) -> None:
        own = self.pet_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"PET state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    # -- undo --------------------------------------------------------------------------------
    def _finish(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        for module in self.model.modules():  # PET's forward bound since (e.g. by unpatch_clip)
            if L.runs_pet_forward(module):
                module.__dict__.pop("forward")
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._requires_grad.clear()
        self.modules.clear()
        self.active = False
        _rebuild_plan(self.model)

    def merge(self) -> nn.Module:
        """Fold LoRA into the pre-trained weights and remove the PET modules; returns the model.
        Only LoRA is linear in its input: the adapters (GELU) and gates cannot be folded."""
        self._check_active()
        if not isinstance(self.config, LoRAConfig):
            raise NotImplementedError(f"{self.config.method} cannot be merged into the weights (its "
                                      "adapter and gate are nonlinear); use remove() or keep the modules")
        for undo in reversed(self._lora_undo):
            undo(True)
        self._lora_undo.clear()
        self._finish()
        return self.model

    def remove(self) -> nn.Module:
        """Take every PET module out; the model is exactly the original again. Returns it."""
        self._check_active()
        for undo in reversed(self._lora_undo):
            undo(False)
        self._lora_undo.clear()
        self._finish()
        return self.model

    def _check_active(self):
        if not self.active:
            raise RuntimeError("this PET handle was already merged or removed")

    def __repr__(self):
        return (f"PetHandle({self.config.method}, {len(self.modules)} modules, "
                f"{self.num_trainable() if self.active else 0} trainable parameters)")


def apply_pet(model: nn.Module, config: PetConfig,
              filter_fn: Callable[[str, nn.Module], bool] | None = None) -> PetHandle:
    """Inject ``config``'s modules into ``model`` (in place) and freeze everything else.

    ``filter_fn(name, module)`` may veto single insertion points: it gets
    ``"<block name>.<attn|mlp|cross>"`` and the block for sub-layer modules, and the qualified
    name and module of each LoRA target (an nn.Linear, or the attention module for a packed
    in-projection). Raises ValueError when nothing matched.
    """
    from skipkernels.checks import check_model
    check_model("model", model)
    inject = INJECTORS.get(type(config))
    if inject is None:
        raise TypeError(f"config must be a PET method's config (VLPETConfig, AdapterConfig, LoRAConfig, or "
                        f"pet_config('lora')), got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (name, module) -> bool, got {type(filter_fn).__name__}")
    if has_pet(model):
        raise ValueError("the model already holds PET modules; remove() them before applying again")
    blocks = L.find_blocks(model)
    if not blocks:
        raise ValueError(f"no transformer blocks found in {type(model).__name__}; supported: open_clip "
                         "blocks, Hugging Face BART layers and T5 blocks (see pet.layouts.register_layout)")
    handle = PetHandle(model, config)
    handle._base_keys = list(model.state_dict().keys())
    try:
        for block in blocks:
            if block.index < config.skip_layers:
                continue
            if block.is_decoder:
                mode = config.resolved_decoder()
                if mode == "none":
                    continue
                if mode == "value_adapter":
                    _add_value_adapter(handle, block, filter_fn)
                    continue
            inject(handle, block, filter_fn)
        _install_clip_forwards(handle)
        if not handle.modules:
            raise ValueError(f"apply_pet({config.method}) matched nothing: check targets "
                             f"{config.resolved_targets()}, skip_layers={config.skip_layers} and filter_fn")
        _freeze(handle)
    except Exception:
        if handle.active:
            handle.remove() if handle.modules else handle._finish()
        raise
    finally:
        _rebuild_plan(model)
    return handle


def _rebuild_plan(model: nn.Module) -> None:
    """PET modules were added or taken out: the plan the model holds (``patch_clip``'s, a tuner's)
    is built again, which routes the patched blocks through their new plans."""
    from skipkernels.ops.block import held_plan
    plan = held_plan(model)
    if plan is not None:
        plan.rebuild()


def _freeze(handle: PetHandle) -> None:
    pet_ids = {id(p) for p in handle.pet_parameters()}
    patterns = handle.config.train_extra
    for name, p in handle.model.named_parameters():
        handle._requires_grad.append((p, p.requires_grad))
        keep = id(p) in pet_ids or any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(keep)


def _register(handle: PetHandle, name: str, module: nn.Module, like: torch.Tensor) -> nn.Module:
    module.to(device=like.device, dtype=like.dtype)
    handle.modules[name] = module
    return module


def _block_param(block: L.Block) -> torch.Tensor:
    return next(block.module.parameters())


def _ensure_clip_forward(handle: PetHandle, block: L.Block) -> None:
    """Blocks patch_clip routes through the op layer take PET's modules as hooks there
    (``block_hooks``); the others get PET's forward (``_install_clip_forwards``, once every module
    is in), in which the modules apply."""
    from skipkernels.ops.block import routed_plan
    if routed_plan(block.module) is None and block.owns_forward:
        handle._clip_forwards.setdefault(block.name, block.module)


def _install_clip_forwards(handle: PetHandle) -> None:
    for module in handle._clip_forwards.values():
        handle._undo.append(L.install_clip_forward(module))


def _add_modifiers(handle: PetHandle, block: L.Block, filter_fn) -> None:
    cfg = handle.config
    width = block.width
    rank = cfg.rank_for(width)
    ref = _block_param(block)
    for kind in cfg.resolved_targets():
        sub = block.sublayers.get(kind)
        if sub is None:
            continue
        point = f"{block.name}.{kind}"
        if filter_fn is not None and not filter_fn(point, block.module):
            continue
        vlpet = isinstance(cfg, VLPETConfig)
        if vlpet:
            modifier = M.VLPETModifier(width, cfg.granularity, rank, cfg.heads, cfg.gate_rank,
                                       cfg.scale, block.token_dim, cfg.backend)
        else:
            modifier = M.HoulsbyAdapter(width, rank)
        child = f"pet_{kind}"
        _register(handle, f"{block.name}.{child}" if block.name else child, modifier, ref)
        block.module.add_module(child, modifier)
        handle._undo.append(_child_remover(block.module, child))
        if block.owns_forward:
            _ensure_clip_forward(handle, block)
        else:
            needs_x = vlpet and cfg.granularity in ("large", "middle_x", "small")
            handle._undo.append(L.install_hooked_modifier(sub, modifier, needs_x))


def _child_remover(parent: nn.Module, child: str) -> Callable:
    def undo():
        parent._modules.pop(child, None)
    return undo


def _add_value_adapter(handle: PetHandle, block: L.Block, filter_fn) -> None:
    sub = block.sublayers.get("cross")
    if sub is None or sub.value is None:
        return
    point = f"{block.name}.cross"
    if filter_fn is not None and not filter_fn(point, block.module):
        return
    linear = sub.value
    rank = handle.config.rank_for(block.width)
    adapter = M.ParallelAdapter(linear.in_features, linear.out_features, rank)
    prefix = f"{block.name}." if block.name else ""
    owner_name = next(n for n, m in block.module.named_modules() if m is linear)
    _register(handle, f"{prefix}{owner_name}.pet_value_adapter", adapter, linear.weight)
    hook = M.install_value_adapter(linear, adapter)
    handle._undo.append(lambda: M.uninstall_value_adapter(linear, hook))


def _lora_targets(targets):
    """(attribute names of nn.Linear targets, packed slices) from the configured target names."""
    names, slices = set(), []
    for t in targets:
        if t in ("q", "k", "v"):
            slices.append(t)
            names.update(LORA_ALIASES[t])
        elif t == "in_proj":
            slices.append("in_proj")
        elif t in LORA_ALIASES:
            names.update(LORA_ALIASES[t])
        else:
            names.add(t)
    if "in_proj" in slices and len(slices) > 1:
        raise ValueError("LoRA target 'in_proj' (the whole packed weight) excludes 'q', 'k', 'v'")
    return names, tuple(slices)


def _add_lora(handle: PetHandle, block: L.Block, filter_fn) -> None:
    cfg = handle.config
    names, slices = _lora_targets(cfg.resolved_targets())
    rank = cfg.rank_for(block.width)
    prefix = f"{block.name}." if block.name else ""
    count = len(handle.modules)
    for qual, module in list(block.module.named_modules()):
        full = prefix + qual if qual else block.name
        if qual.split(".")[-1].startswith(("lora", "pet_")):
            continue
        packed = module._parameters.get("in_proj_weight") if hasattr(module, "_parameters") else None
        if slices and isinstance(packed, nn.Parameter) and packed.dim() == 2 \
                and packed.shape[0] == 3 * packed.shape[1]:
            if filter_fn is None or filter_fn(full, module):
                lora = M.PackedLoRA(packed.shape[1], slices, rank, cfg.alpha, cfg.dropout)
                _register(handle, f"{full}.{M.lora_child_name('in_proj_weight')}", lora, packed)
                M.install_weight_lora(module, "in_proj_weight", lora)
                handle._lora_undo.append(_weight_lora_undo(module, "in_proj_weight"))
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child_name not in names:
                continue
            child_full = f"{full}.{child_name}" if full else child_name
            if filter_fn is not None and not filter_fn(child_full, child):
                continue
            lora = M.LoRAFactors(child.in_features, child.out_features, rank, cfg.alpha, cfg.dropout)
            if isinstance(module, nn.MultiheadAttention) or any(child is w for w in block.weight_read):
                # nn.MultiheadAttention reads out_proj.weight itself, never calls out_proj; the op
                # layer reads the projections the adapter names (e.g. separate q, k, v read as one
                # packed projection) as tensors.
                _register(handle, f"{child_full}.{M.lora_child_name('weight')}", lora, child.weight)
                M.install_weight_lora(child, "weight", lora)
                handle._lora_undo.append(_weight_lora_undo(child, "weight"))
            else:
                _register(handle, f"{child_full}.lora", lora, child.weight)
                hook = M.install_linear_lora(child, lora)
                handle._lora_undo.append(_linear_lora_undo(child, hook))
    if block.owns_forward and len(handle.modules) > count:
        _ensure_clip_forward(handle, block)


def _weight_lora_undo(module, weight_name):
    return lambda merge: M.uninstall_weight_lora(module, weight_name, merge)


def _linear_lora_undo(linear, hook):
    return lambda merge: M.uninstall_linear_lora(linear, hook, merge)


# Each method's config type and the injector that puts its modules into one block.
INJECTORS = {VLPETConfig: _add_modifiers, AdapterConfig: _add_modifiers, LoRAConfig: _add_lora}
