"""What ``apply_pet`` injects: the PET methods and ``PetConfig``."""
from __future__ import annotations

from dataclasses import dataclass, field

from skipkernels.ops.policy import Backend

# The one list of PET methods; skipkernels.skip.modes offers each as a tuning mode (PET_MODES).
METHODS = ("vlpet-large", "vlpet-middle-x", "vlpet-middle-y", "vlpet-small", "adapter", "lora")
_GRANULARITY = {"vlpet-large": "large", "vlpet-middle-x": "middle_x",
                "vlpet-middle-y": "middle_y", "vlpet-small": "small"}
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


@dataclass
class PetConfig:
    """What to inject.

    method: one of ``METHODS``.
    rank: adapter bottleneck r (VL-PET, Adapter, decoder value adapter) or LoRA rank; None means
        width // 8 for adapters (96 at width 768, the paper's setting) and 4 for LoRA.
    heads: N_h of VL-PET's multi-head down-projection (r must be a multiple).
    gate_rank: low rank of the ``large`` gate; None means ``rank``.
    scale: s; None means 1 / G_init (2 for sigmoid gates, 1 for middle-y): the initial model is
        then exactly the original. The paper's scripts used 1 (BART) and 0.3 (T5).
    lora_alpha: LoRA α (ΔW scaled by α / r); None means α = r. lora_dropout: on LoRA's input.
    targets: sub-layers for VL-PET/Adapter (subset of ``SUBLAYER_TARGETS``, default attn, mlp);
        projections for LoRA: canonical names in ``LORA_ALIASES`` (q/k/v also select slices of a
        packed in-projection), ``"in_proj"`` for one factor pair over a whole packed q/k/v
        weight, or raw attribute names; default q, k, v.
    skip_layers: ω; only blocks with index ≥ ω get modules (the frozen LSkip prefix stays as is).
    decoder: for decoder blocks (those with cross-attention): ``"value_adapter"`` (VL-PET's
        lightweight decoder design, default for vlpet-*), ``"same"`` (as the encoder; default for
        adapter and lora) or ``"none"``.
    train_extra: fnmatch patterns of base parameter names that stay trainable (e.g. the paper's
        unfrozen encoder LayerNorms ``"*.layer_norm.weight"``, or ``"visual.proj"``).
    backend: the KernelPolicy (or backend name) of the VL-PET gated update where no route hands one
        in: the hook-based families (BART, T5). None: the route's policy on open_clip blocks, else
        the ambient one.
    """
    method: str = "vlpet-large"
    rank: int | None = None
    heads: int = 4
    gate_rank: int | None = None
    scale: float | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    skip_layers: int = 0
    decoder: str | None = None
    train_extra: tuple[str, ...] = field(default_factory=tuple)
    backend: Backend = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown PET method {self.method!r}; expected one of {METHODS}")
        if self.targets is not None:
            self.targets = tuple(self.targets)
            if not self.is_lora:
                bad = [t for t in self.targets if t not in SUBLAYER_TARGETS]
                if bad:
                    raise ValueError(f"targets {bad} are not sub-layers {SUBLAYER_TARGETS}")
        if self.decoder is not None and self.decoder not in DECODER_MODES:
            raise ValueError(f"decoder must be one of {DECODER_MODES}, got {self.decoder!r}")
        if self.skip_layers < 0:
            raise ValueError(f"skip_layers must be >= 0, got {self.skip_layers}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be positive, got {self.rank}")
        self.train_extra = tuple(self.train_extra)


    @property
    def is_lora(self) -> bool:
        return self.method == "lora"

    @property
    def granularity(self) -> str | None:
        return _GRANULARITY.get(self.method)

    def resolved_targets(self) -> tuple[str, ...]:
        if self.targets is not None:
            return self.targets
        return ("q", "k", "v") if self.is_lora else ("attn", "mlp")

    def resolved_decoder(self) -> str:
        if self.decoder is not None:
            return self.decoder
        return "value_adapter" if self.granularity else "same"

    def rank_for(self, width: int) -> int:
        if self.rank is not None:
            return self.rank
        if self.is_lora:
            return 4
        r = max(1, width // 8)
        return max(self.heads, r - r % self.heads) if self.granularity else r


def trainable_modules_for_mode(mode: str, skip_layers: int | None = None, **overrides) -> PetConfig:
    """The PetConfig for a trainer mode (``"vlpet-large"``, ..., ``"adapter"``, ``"lora"``;
    ``"vlpet"`` means ``"vlpet-large"``); ``skip_layers`` is LSkip's ω, 0 when not given."""
    method = "vlpet-large" if mode == "vlpet" else mode
    if skip_layers is not None:
        overrides["skip_layers"] = skip_layers
    return PetConfig(method=method, **overrides)


