"""Parameter-efficient tuning: VL-PET granularity-controlled modules, Adapter and LoRA.

``config`` says what to inject (``VLPETConfig``, ``AdapterConfig``, ``LoRAConfig``; ``pet_config``),
``inject`` injects it and undoes it (``apply_pet``, ``PetHandle``), ``hooks`` hands a block's
modules to the op layer (``block_hooks``).
"""
from skipkernels.pet.config import (METHODS, AdapterConfig, LoRAConfig, PetConfig, VLPETConfig, pet_config,
                                    trainable_modules_for_mode)
from skipkernels.pet.hooks import block_hooks, has_pet
from skipkernels.pet.inject import PetHandle, apply_pet
from skipkernels.pet.layouts import find_blocks, register_layout
from skipkernels.pet.modules import (GRANULARITIES, HoulsbyAdapter, LoRAFactors, MultiHeadAdapter,
                                     ParallelAdapter, VLPETModifier)

__all__ = ["METHODS", "GRANULARITIES", "PetConfig", "VLPETConfig", "AdapterConfig", "LoRAConfig", "pet_config",
           "PetHandle", "apply_pet", "trainable_modules_for_mode", "has_pet", "block_hooks", "find_blocks",
           "register_layout", "VLPETModifier", "HoulsbyAdapter", "LoRAFactors", "MultiHeadAdapter", "ParallelAdapter"]
