"""Building the compiled ops (``csrc/``) for the torch that imports them.

Two builds share this file: ``setup.py`` at install (``pip install --no-build-isolation .``) and
the just-in-time build on first use (``skipkernels._ext``), which compiles with ninja into a
cache folder keyed by torch, CUDA, Python, GPU architectures and a hash of the sources. It imports
only the standard library and torch, so ``setup.py`` loads it by path, without the package.

Variables: ``SKIPKERNELS_CACHE`` (cache folder; default ``$XDG_CACHE_HOME/skipkernels`` or
``~/.cache/skipkernels``), ``SKIPKERNELS_JIT=0`` (never compile on first use),
``SKIPKERNELS_NO_CUDA=1`` (CPU ops only), ``CUDA_HOME``/``CUDA_PATH`` (the toolkit),
``TORCH_CUDA_ARCH_LIST`` (GPU architectures), ``CXX`` (the C++ compiler).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

MODULE = "skipkernels_C"  # the just-in-time module's name (the installed one is skipkernels._C)
STAMP = "_C.build.json"  # beside an installed _C: the torch it was built for
PACKAGED_SOURCES = "_csrc"  # csrc/ as the wheel carries it, inside the package


def source_root() -> Path | None:
    """csrc/: inside the installed package (wheel, sdist install) or beside it (a checkout)."""
    here = Path(__file__).resolve().parent
    for root in (here / PACKAGED_SOURCES, here.parent / "csrc"):
        if (root / "ops.cpp").is_file():
            return root
    return None


def cpu_sources(root: Path) -> list[Path]:
    return [root / "ops.cpp"] + sorted((root / "cpu").glob("*.cpp"))


def cuda_sources(root: Path) -> list[Path]:
    """*.cu: kernels and launchers (nvcc); *_host.cpp: checks, allocations and read-backs (the C++
    compiler, so exceptions thrown there reach Python; see csrc/cuda/launch.h)."""
    return sorted((root / "cuda").glob("*.cu")) + sorted((root / "cuda").glob("*_host.cpp"))


def headers(root: Path) -> list[Path]:
    return sorted(p for pattern in ("*.h", "*.cuh") for p in root.rglob(pattern))


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit folder, why) for the CUDA build: ``CUDA_HOME``/``CUDA_PATH`` when set, otherwise the
    toolkit of ``nvcc``'s resolved path (``/usr/local/bin/nvcc`` is often a link into it), and only
    a folder that holds the CUDA headers (``include/cuda_runtime.h``)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((os.environ[var], f"${var}"))
            break
    else:
        nvcc = shutil.which("nvcc")
        if nvcc:
            candidates.append((str(Path(os.path.realpath(nvcc)).parent.parent), f"nvcc at {os.path.realpath(nvcc)}"))
        candidates.append(("/usr/local/cuda", "/usr/local/cuda"))
    for home, source in candidates:
        if (Path(home) / "include" / "cuda_runtime.h").is_file() and (Path(home) / "bin" / "nvcc").exists():
            return home, f"CUDA toolkit {home} (from {source})"
    tried = ", ".join(f"{home} (from {source})" for home, source in candidates)
    return None, f"no CUDA toolkit with headers (include/cuda_runtime.h) found; tried {tried}"


def cuda_plan(torch) -> tuple[bool, str | None, str]:
    """(build the CUDA ops?, toolkit folder, why) for the running ``torch``."""
    if os.environ.get("SKIPKERNELS_NO_CUDA", "0") == "1":
        return False, None, "SKIPKERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, None, f"torch {torch.__version__} is a CPU build"
    home, why = find_cuda_home()
    return home is not None, home, why


def cuda_arch_list(torch) -> str:
    """``TORCH_CUDA_ARCH_LIST`` when set, else the visible GPUs' architectures (what the build
    compiles for; part of the cache key)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return "8.0;9.0"


def sources_hash(root: Path, with_cuda: bool) -> str:
    digest = hashlib.sha256()
    files = cpu_sources(root) + (cuda_sources(root) if with_cuda else []) + headers(root)
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_stamp(torch, with_cuda: bool, arch: str | None) -> dict:
    """What a build was made for; an installed ``_C`` whose stamp differs from the running torch
    is not imported (it would fail on undefined symbols, or worse)."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda if with_cuda else None,
            "with_cuda": with_cuda, "arch": arch if with_cuda else None,
            "python": sysconfig.get_config_var("SOABI") or sys.version.split()[0]}


def stamp_mismatch(stamp: dict, torch) -> str | None:
    """Why a build stamped ``stamp`` does not fit the running torch, or None."""
    if stamp.get("torch") != torch.__version__:
        return f"built for torch {stamp.get('torch')}, running torch {torch.__version__}"
    if stamp.get("with_cuda") and stamp.get("cuda") != torch.version.cuda:
        return f"built for CUDA {stamp.get('cuda')}, running torch has CUDA {torch.version.cuda}"
    return None


def cache_root() -> Path:
    if os.environ.get("SKIPKERNELS_CACHE"):
        return Path(os.environ["SKIPKERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "skipkernels"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def compiler_problem() -> str | None:
    """Why the C++ compiler cannot build, checked by compiling nothing (a second), or None."""
    cxx = compiler()
    exe = shutil.which(cxx.split()[0]) if cxx else None
    if exe is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)"
    try:
        run = subprocess.run([*cxx.split(), "-x", "c++", "-E", "-"], input="int main(){}", capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"the C++ compiler {cxx!r} does not run: {err}"
    if run.returncode != 0:
        return f"the C++ compiler {cxx!r} fails: {(run.stderr or run.stdout).strip()[-300:] or 'exit ' + str(run.returncode)}"
    return None


def build_key(torch, root: Path, with_cuda: bool, arch: str | None) -> str:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    device = f"cu{torch.version.cuda}-sm{arch.replace(';', '_').replace('.', '').replace('+PTX', 'ptx')}" \
        if with_cuda else "cpu"
    return f"torch{torch.__version__.replace('+', '_')}-{device}-{py}-{sources_hash(root, with_cuda)}"


def compile_flags(with_cuda: bool) -> dict:
    """Flags shared by both builds (no -std: torch's cpp_extension adds the one its headers need)."""
    macros = ["-DSKIPKERNELS_WITH_CUDA"] if with_cuda else []
    return {"cxx": ["-O3", "-fopenmp", *macros], "nvcc": ["-O3", *macros], "ldflags": ["-lgomp"]}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the whole file or none
