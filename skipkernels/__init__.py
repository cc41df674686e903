"""skipkernels: fast, lean Skip Tuning (LSkip + CSkip) of open_clip CLIP models."""
from skipkernels._version import __version__
from skipkernels.info import info
from skipkernels.ops.policy import KernelPolicy, use_backend, use_policy
from skipkernels.patch import patch_clip, unpatch_clip
from skipkernels.models import register_with_open_clip as _register_with_open_clip

# The shipped configs by name in open_clip too: open_clip.create_model(name, pretrained="RUN/model.pt")
_register_with_open_clip()

__all__ = ["patch_clip", "unpatch_clip", "SkipTuner", "SkipConfig", "KernelPolicy", "info",
           "use_policy", "use_backend", "__version__"]


def __getattr__(name):
    # The tuner pulls in open_clip and the data stack; load it on first use.
    if name in ("SkipTuner", "SkipConfig"):
        from skipkernels.skip import tuner
        return getattr(tuner, name)
    raise AttributeError(f"module 'skipkernels' has no attribute {name!r}")
