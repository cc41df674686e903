"""The README's Python example runs as written, in its order, in a fresh interpreter of the
test's venv: only the downloaded ViT-B/16 weights and tokenizer are replaced by the shipped
pretrained tiny model (the same open_clip calls), and two photos are written where it reads them."""
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_python_example_runs_as_written(tmp_path):
    from skipkernels.models import SHIPPED_WEIGHTS
    (block,) = python_blocks()
    assert block.startswith("import open_clip, skipkernels, torch\n")  # open_clip imported first, as a user does
    download = 'open_clip.create_model_and_transforms("ViT-B-16", pretrained="openai")'
    tokenizer = 'open_clip.get_tokenizer("ViT-B-16")'
    assert download in block and tokenizer in block
    configs = ROOT / "skipkernels" / "configs"
    weights = SHIPPED_WEIGHTS["skipkernels-tiny-shapes"]
    code = block.replace(download, f'open_clip.create_model_and_transforms("skipkernels-tiny-shapes", '
                                   f'pretrained={str(weights)!r})')
    code = code.replace(tokenizer, 'open_clip.get_tokenizer("skipkernels-tiny-shapes")')
    first, rest = code.split("\n", 1)  # the tiny model's config is made known to open_clip after the imports
    code = f"{first}\nopen_clip.add_model_config({str(configs)!r})\n{rest}"
    code += "\nassert torch.isfinite(loss) and tuner.last_selected.numel() >= 2\nprint('loss', float(loss))\n"
    for name, colour in (("cat.jpg", (200, 40, 40)), ("dog.jpg", (40, 40, 200))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / name)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SkipTuner(" in proc.stdout and "omega 2 (default: half of the 4 blocks)" in proc.stdout
    assert "loss " in proc.stdout


def test_import_open_clip_first_works():
    """import open_clip before skipkernels (and transformers' BART) in a fresh interpreter."""
    code = "import open_clip, skipkernels\nfrom transformers import BartForConditionalGeneration\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
