"""The build rules shared by setup.py and the just-in-time build: the CUDA toolkit, the stamp, the key."""
import types

import pytest
import torch

from skipkernels import _build, _ext
from skipkernels.cli import main


def _toolkit(folder, headers=True):
    (folder / "bin").mkdir(parents=True)
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    if headers:
        (folder / "include").mkdir()
        (folder / "include" / "cuda_runtime.h").write_text("")
    return folder


def _clean_env(monkeypatch, path):
    for var in ("CUDA_HOME", "CUDA_PATH", "SKIPKERNELS_NO_CUDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(path))


def test_cuda_home_from_nvcc_resolved_through_its_link(tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    links = tmp_path / "usr-local-bin"
    links.mkdir()
    (links / "nvcc").symlink_to(toolkit / "bin" / "nvcc")  # /usr/local/bin/nvcc -> the toolkit's
    _clean_env(monkeypatch, links)
    home, why = _build.find_cuda_home()
    assert home == str(toolkit) and "nvcc at" in why


def test_cuda_home_variable_wins_and_a_toolkit_without_headers_is_refused(tmp_path, monkeypatch):
    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(tmp_path / "good")))
    assert _build.find_cuda_home()[0] == str(tmp_path / "good")
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(tmp_path / "bare", headers=False)))
    home, why = _build.find_cuda_home()
    assert home is None and "cuda_runtime.h" in why and "bare" in why


def test_cuda_plan_builds_cpu_ops_only_where_it_must(tmp_path, monkeypatch):
    _clean_env(monkeypatch, tmp_path)
    cpu_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda=None), __version__="2.13.0+cpu")
    assert _build.cuda_plan(cpu_torch) == (False, None, "torch 2.13.0+cpu is a CPU build")
    cuda_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda="13.0"), __version__="2.11.0+cu130")
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(tmp_path / "bare", headers=False)))
    with_cuda, home, why = _build.cuda_plan(cuda_torch)
    assert not with_cuda and home is None and "headers" in why
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(tmp_path / "good")))
    assert _build.cuda_plan(cuda_torch)[:2] == (True, str(tmp_path / "good"))
    monkeypatch.setenv("SKIPKERNELS_NO_CUDA", "1")
    assert _build.cuda_plan(cuda_torch) == (False, None, "SKIPKERNELS_NO_CUDA=1")


def test_stamp_says_which_torch_a_build_fits():
    stamp = _build.build_stamp(torch, False, None)
    assert _build.stamp_mismatch(stamp, torch) is None
    assert "built for torch 2.0.0" in _build.stamp_mismatch({**stamp, "torch": "2.0.0"}, torch)
    other_cuda = types.SimpleNamespace(__version__=torch.__version__, version=types.SimpleNamespace(cuda="13.0"))
    assert "CUDA 12.1" in _build.stamp_mismatch({**stamp, "with_cuda": True, "cuda": "12.1"}, other_cuda)


def test_build_key_follows_the_sources(tmp_path):
    root = tmp_path / "csrc"
    (root / "cpu").mkdir(parents=True)
    (root / "ops.cpp").write_text("int a;")
    (root / "skipkernels.h").write_text("")
    key = _build.build_key(torch, root, False, None)
    assert key.startswith(f"torch{torch.__version__.replace('+', '_')}-cpu-py")
    (root / "skipkernels.h").write_text("// changed")
    assert _build.build_key(torch, root, False, None) != key  # a changed header is a new build


def test_the_shipped_sources_are_found():
    root = _build.source_root()
    assert root is not None and (root / "ops.cpp").is_file()
    assert {p.name for p in _build.cpu_sources(root)} >= {"ops.cpp", "subset_ce.cpp", "class_select.cpp"}
    assert {p.name for p in _build.cuda_sources(root)} >= {"subset_ce.cu", "subset_ce_host.cpp"}


def test_compiler_problem_names_the_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/bin/false")
    assert "'/bin/false' fails" in _build.compiler_problem()
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert "not on PATH" in _build.compiler_problem()


def test_build_command_reports_where_the_ops_are(capsys, monkeypatch):
    monkeypatch.setenv("SKIPKERNELS_JIT", "1")  # the command sets it: restored after the test
    code = main(["build"])
    out, err = capsys.readouterr()
    if _ext.COMPILED_OPS:
        assert code == 0 and "class_select" in out and _ext.status()["state"] in out
    else:
        assert code == 1 and "skipkernels build: error:" in err


def test_status_of_a_loaded_process_names_its_origin():
    _ext.load()
    state = _ext.status()
    expected = {"installed": "built at install", "cached": "built and cached", "compiled": "compiled in this process",
                None: "unavailable"}[_ext.origin]
    assert state["state"] == expected and state["detail"]


@pytest.mark.parametrize("attr", ["COMPILED_OPS", "CUDA_BUILT", "load_error", "_C", "origin"])
def test_lazy_names_resolve(attr):
    getattr(_ext, attr)  # resolved on first access, then a plain module constant
    assert attr in vars(_ext)
