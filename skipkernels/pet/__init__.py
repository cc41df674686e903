"""Parameter-efficient tuning: VL-PET granularity-controlled modules, Adapter and LoRA."""
from skipkernels.pet.apply import (METHODS, PetConfig, PetHandle, apply_pet, block_has_pet, block_hooks, has_pet,
                                   trainable_modules_for_mode)
from skipkernels.pet.layouts import find_blocks, register_layout
from skipkernels.pet.modules import (GRANULARITIES, HoulsbyAdapter, LoRAFactors, MultiHeadAdapter,
                                     ParallelAdapter, VLPETModifier)

__all__ = ["METHODS", "GRANULARITIES", "PetConfig", "PetHandle", "apply_pet", "trainable_modules_for_mode",
           "has_pet", "block_has_pet", "block_hooks", "find_blocks", "register_layout", "VLPETModifier",
           "HoulsbyAdapter", "LoRAFactors", "MultiHeadAdapter", "ParallelAdapter"]
