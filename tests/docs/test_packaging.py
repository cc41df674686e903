"""pip install into the user's own environment: the sdist and the wheel from a clean copy of the
tree, installed with pip's defaults into a fresh venv that holds the pinned torch; the compiled ops
built on first use for that torch, cached, reused; a stale _C and a missing compiler handled.

Slow (a just-in-time build of the C++ CPU ops, about a minute), so the steps share one venv and
one cache and run in order inside a single test.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A Skip Tuning step on the shipped tiny model whose policy demands the compiled ops, against the
# reference ops; prints where the ops came from. Run from a folder outside the tree.
STEP = r"""
import json, sys, torch, skipkernels
from skipkernels import _ext
from skipkernels.models import create_model
assert "site-packages" in skipkernels.__file__, skipkernels.__file__
backend = sys.argv[1]
def step(policy):
    torch.manual_seed(0)
    model, tokenizer = create_model("skipkernels-tiny-shapes")
    model = skipkernels.patch_clip(model, policy=policy)
    names = ["red circle", "blue square", "green triangle", "red square"]
    tuner = skipkernels.SkipTuner(model, names, tokenizer, skipkernels.SkipConfig(top_ratio=0.5, max_top=3, lam=0.3))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = tuner.loss(tuner.image_prefix(images), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    grads = [p.grad.clone() for p in tuner.parameters() if p.grad is not None]
    return loss.detach(), grads
loss, grads = step(skipkernels.KernelPolicy(backend=backend))
ref_loss, ref_grads = step(skipkernels.KernelPolicy(backend="torch"))
torch.testing.assert_close(loss, ref_loss)
for g, r in zip(grads, ref_grads):
    torch.testing.assert_close(g, r)
print(json.dumps({"status": _ext.status(), "ops": sorted(_ext.COMPILED_OPS), "loss": float(loss)}))
"""


def _run(cmd, cwd, env=None, timeout=600, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _clean_copy(dest: Path) -> Path:
    """The tree as a fresh clone holds it: tracked and untracked-but-not-ignored files."""
    files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], ROOT).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _venv_with_pinned_stack(dest: Path) -> Path:
    """A fresh venv in which torch, open_clip & co. are installed (this venv's own packages,
    linked), and skipkernels is not."""
    _run([sys.executable, "-m", "venv", str(dest)], dest.parent)
    python = dest / "bin" / "python"
    deps = dest.parent / "pinned-stack"
    deps.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    shim = None
    for entry in here.iterdir():
        name = entry.name
        if name.startswith("_skipkernels_torchvision_shim") and name.endswith(".py"):
            shim = name
        if name.startswith(("skipkernels", "__editable__", "_skipkernels", "__pycache__")) or name.endswith(".pth"):
            continue
        (deps / name).symlink_to(entry)
    if shim:  # the CPU torch beside PyPI's CUDA torchvision needs .ci/install's start-up hook
        (deps / shim).symlink_to(here / shim)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     dest.parent).stdout.strip())
    (site / "pinned-stack.pth").write_text(f"{deps}\n" + (f"import {shim[:-3]}\n" if shim else ""))
    return python


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("the packaging test needs git and a checkout (it copies the tree as a clone holds it)")
    return tmp_path_factory.mktemp("packaging")


def _installed_env(**extra) -> dict:
    """The environment of a process that must run the installed package: no PYTHONPATH (a caller's
    would put a checkout first), none of skipkernels' or Triton's settings."""
    environ = {k: v for k, v in os.environ.items()
               if k != "PYTHONPATH" and not k.startswith(("SKIPKERNELS_", "TRITON_"))}
    return {**environ, **extra}


def _step(python, cwd, cache, backend="cpu", **env):
    environ = _installed_env()
    environ.update(SKIPKERNELS_CACHE=str(cache), **env)
    proc = _run([str(python), "-c", STEP, backend], cwd, env=environ)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_sdist_and_wheel_install_and_build_the_ops_for_the_running_torch(workdir):
    clone = _clean_copy(workdir / "clone")
    dist = workdir / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(clone)], workdir)
    sdist, = dist.glob("skipkernels-*.tar.gz")
    wheel, = dist.glob("skipkernels-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), "an isolated build must not compile (no torch there)"

    import tarfile
    import zipfile
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ["csrc/ops.cpp", "csrc/skipkernels.h", "csrc/cpu/subset_ce.cpp", "csrc/cuda/subset_ce.cu",
                   "csrc/cuda/common.cuh", "csrc/cuda/launch.h", "CMakeLists.txt", "setup.py",
                   "skipkernels/configs/skipkernels-tiny-shapes.json",
                   "skipkernels/weights/skipkernels-tiny-shapes.safetensors",
                   "skipkernels/data/imagenet_subsets.json"]:
        assert needed in names, f"sdist lacks {needed}"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    for needed in ["skipkernels/_csrc/ops.cpp", "skipkernels/_csrc/skipkernels.h", "skipkernels/_csrc/cuda/common.cuh",
                   "skipkernels/_csrc/cuda/class_select.cu", "skipkernels/_build.py",
                   "skipkernels/weights/skipkernels-tiny-shapes.safetensors"]:
        assert needed in names, f"wheel lacks {needed}"

    python = _venv_with_pinned_stack(workdir / "venv")
    pip = [str(python), "-m", "pip", "install", "-q"]
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    cache = workdir / "cache"

    # The wheel, pip's defaults; the first step compiles the ops for this torch, into the cache.
    _run(pip + [str(wheel)], workdir)
    result, stderr = _step(python, elsewhere, cache)
    assert "compiling the CPU ops" in stderr and "compiled the CPU ops in" in stderr, stderr
    assert result["status"]["state"] == "compiled in this process", result
    assert result["ops"] == ["class_scores_topk", "class_select", "subset_logits_ce", "subset_logits_ce_backward"]
    assert str(cache) in result["status"]["detail"]

    # A second process loads the cached build: no compiling.
    result, stderr = _step(python, elsewhere, cache)
    assert "compiling" not in stderr and result["status"]["state"] == "built and cached", (result, stderr)
    info = _run([str(python), "-m", "skipkernels", "info"], elsewhere,
                env=_installed_env(SKIPKERNELS_CACHE=str(cache))).stdout
    assert "class_select                 cpu (built and cached)" in info, info

    # A _C built for another torch (undefined symbol on import): the cached build, not an ImportError.
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     workdir).stdout.strip())
    fake = workdir / "fake.c"
    fake.write_text("extern void symbol_of_another_torch(void);\n"
                    "void *PyInit__C(void) { symbol_of_another_torch(); return 0; }\n")
    installed = site / "skipkernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    _run(["cc", "-shared", "-fPIC", "-o", str(installed), str(fake)], workdir)
    result, stderr = _step(python, elsewhere, cache)
    assert result["status"]["state"] == "built and cached" and "compiling" not in stderr, (result, stderr)
    # ... and one whose stamp names another torch is not even imported.
    (site / "skipkernels" / "_C.build.json").write_text(json.dumps({"torch": "2.0.0", "with_cuda": False}))
    result, _ = _step(python, elsewhere, cache)
    assert result["status"]["state"] == "built and cached", result
    installed.unlink()
    (site / "skipkernels" / "_C.build.json").unlink()

    # No working compiler, empty cache: one clear line, the reference ops, and the step runs.
    result, stderr = _step(python, elsewhere, workdir / "cache-nocxx", backend="auto", CXX="/bin/false")
    assert "the C++ compiler '/bin/false' fails" in stderr and "The reference ops run" in stderr, stderr
    assert stderr.count("compiling them on first use failed") == 1, stderr
    assert result["status"]["state"] == "unavailable" and result["ops"] == [], result
    # SKIPKERNELS_JIT=0: nothing is compiled, and the message says why.
    result, stderr = _step(python, elsewhere, workdir / "cache-off", backend="auto", SKIPKERNELS_JIT="0")
    assert "SKIPKERNELS_JIT=0" in result["status"]["detail"] and "compiling" not in stderr, (result, stderr)

    # The sdist, pip's defaults (what an index serves): installs, and loads the same cached build.
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "skipkernels"], workdir)
    _run(pip + [str(sdist)], workdir)
    result, stderr = _step(python, elsewhere, cache)
    assert result["status"]["state"] == "built and cached", (result, stderr)

    # pip install <a clone>, pip's defaults (as pip install . and pip install git+URL do).
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "skipkernels"], workdir)
    _run(pip + [str(clone)], workdir)
    result, stderr = _step(python, elsewhere, cache)
    assert result["status"]["state"] == "built and cached", (result, stderr)

    # The build at install, without a working compiler: the install still succeeds and says why.
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "skipkernels"], workdir)
    proc = _run([str(python), "-m", "pip", "install", "-v", "--no-build-isolation", str(clone)], workdir,
                env=_installed_env(CXX="/bin/false"))
    assert "building skipkernels._C failed, installing without it" in proc.stdout + proc.stderr
    result, _ = _step(python, elsewhere, cache)
    assert result["status"]["state"] == "built and cached", result


# -- optional dependencies ------------------------------------------------------------------------

def _extras() -> dict:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_each_optional_package_has_its_extra_and_the_test_extra_brings_the_suites():
    from skipkernels._compat import EXTRAS
    extras = _extras()
    names = {extra: {re.split(r"[<>=!~;\[ ]", req, 1)[0].lower() for req in reqs} for extra, reqs in extras.items()}
    assert {"hf": {"transformers"}, "plots": {"matplotlib"}, "tensorboard": {"tensorboard"},
            "export": {"onnx", "onnxscript", "onnxruntime"}}.items() <= names.items(), names
    for package, extra in EXTRAS.items():  # the extra each error message and skip reason names
        assert package in names[extra], (package, extra)
    # What the tests import where installed (and skip, naming it, where not), and what they run.
    assert {"pytest", "pytest-benchmark", "build", "transformers", "matplotlib", "onnx", "onnxscript",
            "onnxruntime"} <= names["test"], names["test"]


def test_a_missing_optional_package_names_its_extra():
    from skipkernels._compat import import_optional, install_hint
    from skipkernels.errors import MissingDependency
    assert install_hint("transformers") == "pip install 'skipkernels[hf]' (or pip install transformers)"
    with pytest.raises(MissingDependency, match=r"--model hf:x needs the skipkernels_no_such_package package"):
        import_optional("skipkernels_no_such_package", "--model hf:x")
    with pytest.raises(ImportError, match=re.escape("pip install 'skipkernels[plots]'")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "matplotlib", None)  # import fails as without the package
            import_optional("matplotlib", "training.png")
