"""Builds skipkernels._C: the C++ CPU ops always, the CUDA ops too when torch has CUDA.

Set SKIPKERNELS_NO_CUDA=1 to build the CPU ops only; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "8.0;9.0"). Without torch at build time the package installs without
``_C`` and uses its reference ops.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    sources = [os.path.relpath(p, ROOT) for p in
               [os.path.join(ROOT, "csrc", "ops.cpp")] + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    if not os.path.exists(os.path.join(ROOT, sources[0])):
        return [], {}
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("SKIPKERNELS_NO_CUDA", "0") != "1")
    # no -std flag: torch.utils.cpp_extension adds the standard its own headers need
    cxx_flags = ["-O3", "-fopenmp"]
    macros = []
    extension = cpp_extension.CppExtension
    extra = {"cxx": cxx_flags}
    libraries = ["gomp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # *.cu: the kernels and their launchers (nvcc); *_host.cpp: checks, allocations and
        # read-backs (the C++ compiler: exceptions thrown there reach Python, see cuda/launch.h)
        sources += [os.path.relpath(p, ROOT) for pattern in ("*.cu", "*_host.cpp")
                    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", pattern)))]
        macros.append(("SKIPKERNELS_WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension
        extra["nvcc"] = ["-O3"]
    ext = extension("skipkernels._C", sources, define_macros=macros, extra_compile_args=extra,
                    libraries=libraries, include_dirs=[os.path.join(ROOT, "csrc")])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
