"""Every tuning mode, and what each one does, resolved once from its name.

``mode_plan(mode, skip_layers)`` is the one place a mode name is interpreted. The tuner, the
trainer and the benchmark read the ``ModePlan`` it returns (``SkipTuner.plan``) and never the name:

- ``skip``      (default) LSkip + CSkip
- ``lskip``     frozen cached prefix, all classes every step
- ``cskip``     full fine-tuning with a class subset per step
- ``ft``        full fine-tuning, all classes
- ``coop``      learned context vectors, frozen model
- a PET method (``PET_MODES``): its modules in every block, the rest frozen
- ``lskip-<PET method>``: the prefix below ω cached, the method's modules only in blocks ≥ ω
  (a combination none of the papers offers)
"""
from __future__ import annotations

import dataclasses

from skipkernels.pet.config import METHODS as PET_MODES  # the one list of PET methods

MODES = ("skip", "lskip", "cskip", "ft", "coop") + PET_MODES + tuple(f"lskip-{m}" for m in PET_MODES)

# What trains (every other parameter is frozen; logit_scale and a SigLIP logit_bias always are):
#   all     every weight of both towers
#   suffix  blocks [skip_layers, L) of both towers and their heads (norm, pooling, projection)
#   prompt  only CoOp's learned context vectors
#   pet     only the PET method's modules, in blocks >= skip_layers
TRAINS = ("all", "suffix", "prompt", "pet")


@dataclasses.dataclass(frozen=True)
class ModePlan:
    """What a mode caches, which classes it runs and what it trains."""
    mode: str
    caches_prefix: bool       # LSkip: image and text tokens at block skip_layers are cached, frozen
    class_subset: bool        # CSkip: a class subset per step; otherwise every class every step
    trains: str               # one of TRAINS
    pet_method: str | None    # the PET method (one of PET_MODES) where trains == "pet"
    skip_layers: int | None   # ω: blocks [0, skip_layers) frozen and cached; 0 where nothing is cached;
    #                           None: the model's default (SkipTuner resolves it: ModelPlan.default_skip_layers)

    def __post_init__(self):
        if self.trains not in TRAINS:
            raise ValueError(f"trains must be one of {TRAINS}, got {self.trains!r}")
        if (self.trains == "pet") != (self.pet_method is not None):
            raise ValueError("a PET method trains its modules, and only a PET method does")
        if not self.caches_prefix and self.skip_layers != 0:
            raise ValueError("skip_layers is 0 where nothing is cached")


def default_skip_layers(n_image: int, n_text: int) -> tuple[int, str]:
    """The default ω for towers of ``n_image`` and ``n_text`` blocks, and why: the paper's
    proportion, half the blocks (6 of ViT-B/16's 12). One ω cuts both towers, so where their
    depths differ it is half of the shallower one."""
    depth = min(n_image, n_text)
    blocks = f"the {depth} blocks" if n_image == n_text else \
        f"the shallower tower's {depth} blocks (image {n_image}, text {n_text})"
    return depth // 2, f"default: half of {blocks}"


def mode_plan(mode: str, skip_layers: int | None) -> ModePlan:
    """The plan of tuner mode ``mode`` (one of ``MODES``) with ω = ``skip_layers`` (None: the model's
    default, not known here)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cached = mode in ("skip", "lskip") or mode.startswith("lskip-")
    method = mode[len("lskip-"):] if mode.startswith("lskip-") else mode
    pet_method = method if method in PET_MODES else None
    if pet_method is not None:
        trains = "pet"
    elif mode == "coop":
        trains = "prompt"
    elif cached:
        trains = "suffix"
    else:
        trains = "all"
    return ModePlan(mode=mode, caches_prefix=cached, class_subset=mode in ("skip", "cskip"), trains=trains,
                    pet_method=pet_method, skip_layers=skip_layers if cached else 0)
