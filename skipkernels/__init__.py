"""skipkernels: fast, lean Skip Tuning (LSkip + CSkip) of open_clip CLIP models."""
from skipkernels._version import __version__
from skipkernels.info import info
from skipkernels.ops.policy import KernelPolicy, use_backend, use_policy
from skipkernels.patch import patch_clip, unpatch_clip
from skipkernels.models import register_with_open_clip as _register_with_open_clip

# The shipped configs by name in open_clip too: open_clip.create_model(name, pretrained="RUN/model.pt")
_register_with_open_clip()

# The public API. Everything past patch_clip pulls in open_clip, the data stack or the trainer, so
# those names load on first use (a bare `import skipkernels` stays light).
_LAZY = {
    "SkipTuner": "skipkernels.skip.tuner", "SkipConfig": "skipkernels.skip.tuner",
    "finetune": "skipkernels.train.job", "TrainConfig": "skipkernels.train.trainer",
    "apply_pet": "skipkernels.pet", "PetHandle": "skipkernels.pet", "pet_config": "skipkernels.pet",
    "VLPETConfig": "skipkernels.pet", "AdapterConfig": "skipkernels.pet", "LoRAConfig": "skipkernels.pet",
    "load_classifier": "skipkernels.prediction", "predict": "skipkernels.prediction",
}

__all__ = ["patch_clip", "unpatch_clip", "KernelPolicy", "info", "use_policy", "use_backend", "__version__",
           *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skipkernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
