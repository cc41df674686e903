"""Installs skipkernels; builds skipkernels._C where the build environment holds torch.

- With pip's default build isolation no torch is installed into the build environment
  (pyproject.toml asks for none), so the wheel is pure Python and carries the C++/CUDA sources
  (``skipkernels/_csrc``): the ops are compiled on first use for the torch that imports them.
- With ``pip install --no-build-isolation .`` the environment's own torch builds ``_C`` now: the
  C++ CPU ops always, the CUDA ops too where torch has CUDA and a toolkit with headers is found
  (``CUDA_HOME``/``CUDA_PATH``, else ``nvcc``'s resolved path). A build that fails (no compiler,
  no headers) says why and the install goes on; the ops are then compiled on first use.

``SKIPKERNELS_NO_CUDA=1`` builds the CPU ops only; ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default "8.0;9.0").
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_skipkernels_build", os.path.join(ROOT, "skipkernels", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
CSRC = os.path.join(ROOT, "csrc")


def _say(message):
    print(f"skipkernels setup: {message}", file=sys.stderr, flush=True)


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package (skipkernels/_csrc) for the just-in-time build."""

    def run(self):
        super().run()
        if os.path.isdir(CSRC) and not self.editable_mode:
            target = os.path.join(self.build_lib, "skipkernels", _build.PACKAGED_SOURCES)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("CMakeLists.txt", "tests"))


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("no torch in the build environment: installing without skipkernels._C "
             "(the ops are compiled on first use for the torch that imports them)")
        return [], {}
    if not os.path.exists(os.path.join(CSRC, "ops.cpp")):
        return [], {}
    root = Path(CSRC)
    with_cuda, cuda_home, why = _build.cuda_plan(torch)
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # torch guesses from nvcc's link, which may lack the headers
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _say(f"building the CPU and CUDA ops for torch {torch.__version__} with the {why}")
    else:
        _say(f"building the CPU ops for torch {torch.__version__} (no CUDA ops: {why})")
    sources = _build.cpu_sources(root) + (_build.cuda_sources(root) if with_cuda else [])
    flags = _build.compile_flags(with_cuda)
    extra = {"cxx": flags["cxx"]}
    extension = cpp_extension.CppExtension
    if with_cuda:
        extension = cpp_extension.CUDAExtension
        extra["nvcc"] = flags["nvcc"]
    ext = extension("skipkernels._C", [os.path.relpath(p, ROOT) for p in sources], extra_compile_args=extra,
                    libraries=["gomp"], include_dirs=[CSRC])
    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None

    class BuildOrSkip(base):
        """A failed compile never fails the install: it says why, and the ops are compiled on
        first use. A successful one leaves a stamp of the torch it was built for beside _C."""

        def run(self):
            self.skipped = False
            try:
                super().run()
            except Exception as err:  # compiler missing or failing, toolkit incomplete, ...
                self.skipped = True
                _say(f"building skipkernels._C failed, installing without it ({type(err).__name__}: "
                     f"{str(err).strip()[-500:]}); the ops are compiled on first use, or the reference "
                     "ops run")
                return
            path = self.get_ext_fullpath("skipkernels._C")
            if os.path.exists(path):
                _build.write_json(Path(path).with_name(_build.STAMP),
                                  _build.build_stamp(torch, with_cuda, arch))

        def get_outputs(self):
            outputs = super().get_outputs()
            if getattr(self, "skipped", False):
                return [path for path in outputs if os.path.exists(path)]
            stamp = os.path.join(os.path.dirname(self.get_ext_fullpath("skipkernels._C")), _build.STAMP)
            return outputs + [stamp] if os.path.exists(stamp) else outputs

    return [ext], {"build_ext": BuildOrSkip}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
