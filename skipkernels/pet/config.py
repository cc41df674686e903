"""What ``apply_pet`` injects: one config type per PET method.

    apply_pet(model, VLPETConfig("large", skip_layers=6))   # VL-PET, one granularity
    apply_pet(model, AdapterConfig(rank=64))                 # Houlsby adapters
    apply_pet(model, LoRAConfig(rank=4, alpha=8))            # LoRA
    apply_pet(model, pet_config("vlpet-small"))             # by method name (a tuning mode's)

Each type is registered to its injector (``skipkernels.pet.inject.INJECTORS``). ``PetConfig`` is
their base: the fields every method has.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from skipkernels.ops.policy import Backend
from skipkernels.pet.modules import GRANULARITIES

# The one list of PET methods; skipkernels.skip.modes offers each as a tuning mode (PET_MODES).
METHODS = ("vlpet-large", "vlpet-middle-x", "vlpet-middle-y", "vlpet-small", "adapter", "lora")
SUBLAYER_TARGETS = ("attn", "mlp", "cross")
# LoRA target aliases: canonical name -> attribute names of nn.Linear projections across families.
LORA_ALIASES = {
    "q": ("q_proj", "q", "query"),
    "k": ("k_proj", "k", "key"),
    "v": ("v_proj", "v", "value"),
    "out": ("out_proj", "o"),
    "fc1": ("c_fc", "fc1", "wi", "wi_0", "wi_1"),
    "fc2": ("c_proj", "fc2", "wo"),
}
DECODER_MODES = ("value_adapter", "same", "none")


@dataclass(kw_only=True)
class PetConfig:
    """The fields of every PET method (use ``VLPETConfig``, ``AdapterConfig`` or ``LoRAConfig``);
    keyword-only, so a method's own first field is its first positional one.

    targets: where the modules go (see each method); None: the method's default.
    skip_layers: ω; only blocks with index ≥ ω get modules (the frozen LSkip prefix stays as is).
    decoder: for decoder blocks (those with cross-attention): ``"value_adapter"`` (VL-PET's
        lightweight decoder design, VL-PET's default), ``"same"`` (as the encoder; the default of
        Adapter and LoRA) or ``"none"``.
    train_extra: fnmatch patterns of base parameter names that stay trainable (e.g. the paper's
        unfrozen encoder LayerNorms ``"*.layer_norm.weight"``, or ``"visual.proj"``).
    """
    targets: tuple[str, ...] | None = None
    skip_layers: int = 0
    decoder: str | None = None
    train_extra: tuple[str, ...] = field(default_factory=tuple)

    default_targets = ("attn", "mlp")
    default_decoder = "same"

    def __post_init__(self):
        if type(self) is PetConfig:
            raise TypeError("PetConfig is the base of VLPETConfig, AdapterConfig and LoRAConfig: use one of them, "
                            "or pet_config(method, ...) with a method of " + ", ".join(METHODS))
        if self.targets is not None:
            if isinstance(self.targets, str):
                raise TypeError(f"targets must be a tuple of names, got the string {self.targets!r}")
            self.targets = tuple(self.targets)
            self.check_targets(self.targets)
        if self.decoder is not None and self.decoder not in DECODER_MODES:
            raise ValueError(f"decoder must be one of {DECODER_MODES}, got {self.decoder!r}")
        if self.skip_layers < 0:
            raise ValueError(f"skip_layers must be >= 0, got {self.skip_layers}")
        if getattr(self, "rank", None) is not None and self.rank < 1:
            raise ValueError(f"rank must be positive, got {self.rank}")
        self.train_extra = tuple(self.train_extra)

    def check_targets(self, targets) -> None:
        bad = [t for t in targets if t not in SUBLAYER_TARGETS]
        if bad:
            raise ValueError(f"targets {bad} are not sub-layers {SUBLAYER_TARGETS}")

    @property
    def method(self) -> str:
        raise NotImplementedError

    def resolved_targets(self) -> tuple[str, ...]:
        return self.targets if self.targets is not None else self.default_targets

    def resolved_decoder(self) -> str:
        return self.decoder if self.decoder is not None else self.default_decoder

    def rank_for(self, width: int) -> int:
        """The adapter bottleneck at this width: ``rank``, or width // 8 (96 at width 768, the paper's)."""
        return self.rank if self.rank is not None else max(1, width // 8)


@dataclass
class VLPETConfig(PetConfig):
    """VL-PET: a ``VLPETModifier`` on each chosen sub-layer (default ``attn`` and ``mlp``) of every
    encoder block with index ≥ ``skip_layers``; decoder blocks get a parallel adapter on the
    cross-attention value projection, no gate (``decoder="value_adapter"``).

    granularity: the gate's, one of ``GRANULARITIES`` (large, middle_x, middle_y, small).
    rank: the adapter bottleneck r; None: width // 8, a multiple of ``heads``.
    heads: N_h of the multi-head down-projection (r must be a multiple).
    gate_rank: low rank of the ``large`` gate; None means ``rank``.
    scale: s; None means 1 / G_init (2 for sigmoid gates, 1 for middle-y): the initial model is
        then exactly the original. The paper's scripts used 1 (BART) and 0.3 (T5).
    backend: the KernelPolicy (or backend name) of the gated update where no route hands one in
        (the hook-based families, BART and T5). None: the route's policy on open_clip blocks,
        else the ambient one.
    """
    granularity: str = "large"
    rank: int | None = None
    heads: int = 4
    gate_rank: int | None = None
    scale: float | None = None
    backend: Backend = None

    default_decoder = "value_adapter"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown VL-PET granularity {self.granularity!r}; expected one of {GRANULARITIES}")
        super().__post_init__()

    @property
    def method(self) -> str:
        return "vlpet-" + self.granularity.replace("_", "-")

    def rank_for(self, width: int) -> int:
        if self.rank is not None:
            return self.rank
        r = max(1, width // 8)
        return max(self.heads, r - r % self.heads)


@dataclass
class AdapterConfig(PetConfig):
    """Houlsby adapters: a ``HoulsbyAdapter`` on each chosen sub-layer (default ``attn`` and
    ``mlp``) of every block (decoders too). rank: the bottleneck; None: width // 8."""
    rank: int | None = None

    @property
    def method(self) -> str:
        return "adapter"


@dataclass
class LoRAConfig(PetConfig):
    """LoRA factors on the chosen projections of every block.

    targets: canonical names in ``LORA_ALIASES`` (q/k/v also select slices of a packed
        in-projection), ``"in_proj"`` for one factor pair over a whole packed q/k/v weight, or
        raw attribute names; default q, k, v.
    rank: the factors' rank; None: 4. alpha: ΔW is scaled by alpha / rank; None: alpha = rank.
    dropout: on LoRA's input.
    """
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0

    default_targets = ("q", "k", "v")

    def check_targets(self, targets) -> None:
        return None  # any attribute name may name a projection

    @property
    def method(self) -> str:
        return "lora"

    def rank_for(self, width: int) -> int:
        return self.rank if self.rank is not None else 4


def pet_config(method: str, **fields_) -> PetConfig:
    """The config of PET method ``method`` (one of ``METHODS``; ``"vlpet"`` is ``"vlpet-large"``)
    with ``fields_``; a field the method does not have is a TypeError naming the ones it has."""
    method = "vlpet-large" if method == "vlpet" else method
    if method not in METHODS:
        raise ValueError(f"unknown PET method {method!r}; expected one of {METHODS}")
    if method.startswith("vlpet-"):
        kind, fields_ = VLPETConfig, {"granularity": method.removeprefix("vlpet-").replace("-", "_"), **fields_}
    else:
        kind = AdapterConfig if method == "adapter" else LoRAConfig
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(fields_) - known)
    if unknown:
        raise TypeError(f"{kind.__name__} ({method}) has no field {', '.join(map(repr, unknown))}; its fields: "
                        f"{', '.join(sorted(known))}")
    return kind(**fields_)


def trainable_modules_for_mode(mode: str, skip_layers: int | None = None, **overrides) -> PetConfig:
    """The config for a tuning mode's PET method (``"vlpet-large"``, ..., ``"adapter"``, ``"lora"``;
    ``"vlpet"`` means ``"vlpet-large"``); ``skip_layers`` is LSkip's ω, 0 when not given."""
    if skip_layers is not None:
        overrides["skip_layers"] = skip_layers
    return pet_config(mode, **overrides)
