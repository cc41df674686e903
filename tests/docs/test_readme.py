"""The README's and each doc's code blocks run as written, and every relative link resolves.

- ```python blocks run, in their order, each in a fresh interpreter of the test's venv, in a
  folder that holds the photos they read (cat.jpg, dog.jpg, photos/<class>/*.jpg). Only the
  downloaded ViT-B/16 weights and tokenizer are replaced by the shipped pretrained tiny model (the
  same open_clip and skipkernels calls).
- ```sh blocks name data and weights that are not here, so each command in them is checked
  instead: a skipkernels command line parses with the CLI's own parser (every subcommand and flag
  exists and takes the value given), a script or test folder it names exists, and a pip extra it
  names is declared in pyproject.toml.
- ```text blocks are printed output and are not run; a block without a language is an error.
"""
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Blocks that another test checks in its own way.
CHECKED_ELSEWHERE = {"ARCHITECTURE.md": "tests/docs/test_architecture_doc.py"}
PAGES = [README] + [doc for doc in DOCS if doc.name not in CHECKED_ELSEWHERE]
SETUP = ("bash .ci/install && .venv/bin/skipkernels demo     # the main job: zero-shot, FT, CoOp, Skip Tuning, "
         "20 s on 2 CPU cores\n"
         "bash .ci/run                                       # the tests (and CUDA/Triton compile-checks, benchmark "
         "smoke run)\n")
FENCE = re.compile(r"^[ \t]*```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", flags=re.S | re.M)


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order."""
    return [(lang.strip(), code) for lang, code in FENCE.findall(page.read_text(encoding="utf-8"))]


def python_blocks(page: Path = README) -> list[str]:
    return [code for lang, code in code_blocks(page) if lang == "python"]


# -- python blocks -----------------------------------------------------------------------------------

def _runnable(block: str) -> str:
    """The block with ViT-B/16's download replaced by the shipped tiny model's weights."""
    from skipkernels.models import SHIPPED_WEIGHTS
    weights = str(SHIPPED_WEIGHTS["skipkernels-tiny-shapes"])
    tiny = "skipkernels-tiny-shapes"
    code = block
    for download, local in [
        ('open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")',
         f'open_clip.create_model_and_transforms("{tiny}", pretrained={weights!r})'),
        ('open_clip.create_model("ViT-B-16", pretrained="openai")',
         f'open_clip.create_model("{tiny}", pretrained={weights!r})'),
        ('open_clip.get_tokenizer("ViT-B-16")', f'open_clip.get_tokenizer("{tiny}")'),
        ('"ViT-B-16", "openai"', f'"{tiny}", None'),  # finetune(data, dataset, model_name, pretrained, ...)
    ]:
        code = code.replace(download, local)
    assert "openai" not in code, f"a download the test does not replace:\n{code}"
    first, rest = code.split("\n", 1)
    if first.startswith("import open_clip"):  # the tiny model's config made known to open_clip after the imports
        configs = ROOT / "skipkernels" / "configs"
        code = f"{first}\nopen_clip.add_model_config({str(configs)!r})\n{rest}"
    return code


def _photos(folder: Path) -> None:
    for name, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        Image.new("RGB", (64, 48), colour).save(folder / f"{name}.jpg")
        (folder / "photos" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (64, 48), tuple(min(255, c + 6 * i) for c in colour)).save(
                folder / "photos" / name / f"{i}.jpg")


def _run_python(block: str, cwd: Path, extra: str = "") -> str:
    proc = subprocess.run([sys.executable, "-c", _runnable(block) + extra], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{block}\n---\n{proc.stderr[-3000:]}"
    assert "deprecated" not in proc.stderr, proc.stderr[-3000:]  # a doc shows the current spelling
    return proc.stdout


def test_the_readme_python_example_runs_as_written(tmp_path):
    block = python_blocks()[0]
    assert block.startswith("import open_clip, skipkernels, torch\n")  # open_clip imported first, as a user does
    assert 'open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")' in block
    assert 'open_clip.get_tokenizer("ViT-B-16")' in block
    _photos(tmp_path)
    out = _run_python(block, tmp_path, "\nassert torch.isfinite(loss) and tuner.last_selected.numel() >= 2\n"
                                       "print('loss', float(loss))\n")
    assert "SkipTuner(" in out and "omega 2 (default: half of the 4 blocks)" in out
    assert "loss " in out


def test_the_readme_quick_start_uses_the_top_level_api():
    code = "".join(python_blocks())
    for name in ["finetune", "TrainConfig", "SkipConfig", "SkipTuner", "patch_clip", "apply_pet", "load_classifier",
                 "predict"]:
        assert re.search(rf"\b(skipkernels\.)?{name}\(", code), f"the README's quick start does not call {name}"


def _blocks(languages: tuple[str, ...]) -> list:
    """One pytest param per block of these languages on every page (README's first python block
    aside: the test above runs it)."""
    params = []
    for page in PAGES:
        for i, (lang, code) in enumerate(code_blocks(page)):
            if lang in languages and not (page == README and code == python_blocks()[0]):
                params.append(pytest.param(page, code, id=f"{_id(page)}-block{i + 1}"))
    return params


@pytest.mark.parametrize(("page", "block"), _blocks(("python",)))
def test_the_python_blocks_run_as_written(page, block, tmp_path):
    _photos(tmp_path)
    _run_python(block, tmp_path)


# -- sh blocks -----------------------------------------------------------------------------------------

def _commands(block: str) -> list[list[str]]:
    """Each command of a shell block as words: continuations joined, comments and `...` dropped,
    split at && and ;, leading VAR=value assignments dropped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        command = []
        for word in words + ["&&"]:
            if word in ("&&", ";"):
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)
                if command:
                    commands.append(command)
                command = []
            elif word != "...":
                command.append(word)
    return commands


def _check_command(words: list[str]) -> None:
    from skipkernels.cli import build_parser
    head = words[0]
    if head == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "skipkernels", words
        words = words[words.index("-m") + 1:]
        head = words[0]
    if Path(head).name == "skipkernels":
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exit_:  # argparse's error (2) or --version / --help (0)
            assert exit_.code == 0, f"skipkernels does not take: {shlex.join(words)}"
    elif head == "bash":
        assert (ROOT / words[1]).is_file(), f"no script {words[1]}"
    elif head == "python":
        if words[1] == "-m":
            assert importlib.util.find_spec(words[2]) is not None, f"no module {words[2]}"
        else:
            assert (ROOT / words[1]).is_file(), f"no script {words[1]}"
    elif head == "pytest":
        paths = [w for w in words[1:] if not w.startswith("-")]
        assert paths and all((ROOT / p).exists() for p in paths), words
    elif head == "pip":
        tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for target in words[2:]:
            extras = re.fullmatch(r"\.\[(.*)\]", target)
            if extras:
                unknown = set(extras.group(1).split(",")) - set(declared)
                assert not unknown, f"pip extras not in pyproject.toml: {unknown}"
            elif not target.startswith("-"):
                assert target == ".", words
    else:
        raise AssertionError(f"no rule checks this command: {shlex.join(words)} (add one to tests/docs/test_readme.py)")


@pytest.mark.parametrize(("page", "block"), _blocks(("sh", "bash")))
def test_the_shell_commands_are_valid(page, block):
    commands = _commands(block)
    assert commands, f"{_id(page)}: an empty sh block"
    for words in commands:
        _check_command(words)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_block_says_what_it_is(page):
    unlabelled = [code[:80] for lang, code in code_blocks(page) if lang not in ("python", "sh", "bash", "text")]
    assert not unlabelled, f"{_id(page)}: blocks without python, sh or text: {unlabelled}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_the_extras_named_are_declared(page):
    """`pip install ".[hf]"` and `skipkernels[export]` in the prose name extras of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = re.findall(r"(?:pip install [\"']?\.|skipkernels)\[([\w,-]+)\]", page.read_text(encoding="utf-8"))
    unknown = {extra for group in named for extra in group.split(",")} - set(declared)
    assert not unknown, f"{_id(page)} names extras that pyproject.toml does not declare: {unknown}"


def test_the_readme_has_the_two_set_up_commands():
    """One command runs the main job on the embedded default model on CPU, one runs the tests;
    each installs what it needs."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    assert [code for lang, code in code_blocks_of(section) if lang == "sh"] == [SETUP]
    assert len(text.splitlines()) <= 250, "the README is the front page: the rest goes to docs/"


def code_blocks_of(text: str) -> list[tuple[str, str]]:
    return [(lang.strip(), code) for lang, code in FENCE.findall(text)]


# -- links ---------------------------------------------------------------------------------------------

def _prose(text: str) -> str:
    """The text without fenced blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens, -1, -2 for repeats."""
    seen, anchors = {}, set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", FENCE.sub("", page.read_text(encoding="utf-8")),
                              flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", [README] + DOCS, ids=_id)
def test_every_relative_link_resolves(page):
    broken = []
    for target in re.findall(r"\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", _prose(page.read_text("utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{_id(page)}: " + "; ".join(broken)


def test_import_open_clip_first_works():
    """import open_clip before skipkernels (and transformers' BART) in a fresh interpreter."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'skipkernels[hf]')")
    code = "import open_clip, skipkernels\nfrom transformers import BartForConditionalGeneration\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
