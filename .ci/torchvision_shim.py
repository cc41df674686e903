"""Installed by .ci/install into its venv (with a .pth line that imports it at start-up): the
PyPI torchvision wheel there is a CUDA build beside a CPU torch, and its first import raises
"operator torchvision::nms does not exist". This finder sees the first ``import torchvision``,
whoever makes it (open_clip, timm, transformers, in any order), and imports it through
skipkernels._compat.import_torchvision, which defines the two missing op schemas only when that
exact error happens. It imports nothing at start-up; a working torchvision is untouched."""
import importlib.util
import sys


class _Imported:
    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


class TorchvisionFinder:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once: the import below and any later one are plain imports
        from skipkernels._compat import import_torchvision
        return importlib.util.spec_from_loader(name, _Imported(import_torchvision()))


if not any(isinstance(f, TorchvisionFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, TorchvisionFinder())
