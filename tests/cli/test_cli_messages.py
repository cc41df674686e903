"""What the command line says: help for every flag, --version, one-line errors that say what is
true (a missing optional package, weights that do not exist, the shipped configs offline), flags
that are never silently ignored, and what a run's folder holds when it is reused: rerun, resumed
after an interruption, started over (its TensorBoard log included)."""
import argparse
import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from skipkernels._version import __version__
from skipkernels.cli import DEMO, _configs, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "skipkernels-tiny", "--skip-layers", "2", "--shots", "8", "--batch-size", "8", "--mixed-batches",
        "--lr", "3e-3", "--lr-image", "3e-3", "--warmup-epochs", "0", "--no-progress"]
STEPS_PER_EPOCH = 6  # 6 base classes x 8 shots, batches of 8


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


# ---------------------------------------------------------------- help and --version

def test_every_flag_of_every_command_has_help():
    parser, commands = _commands()
    missing = [f"{name} {' '.join(action.option_strings) or action.dest}"
               for name, command in [("skipkernels", parser), *commands.items()] for action in command._actions
               if not (action.help or "").strip() or action.help == argparse.SUPPRESS]
    assert missing == []


@pytest.mark.parametrize("command", ["finetune", "eval", "predict", "demo", "bench", "info", "build"])
def test_every_option_with_a_value_says_its_default(command):
    """What --help prints for each option that takes a value names its default: the formatter's
    ``(default: ...)``, or the help's own words where the default is not one value."""
    parser = _commands()[1][command]
    formatter = parser._get_formatter()
    unsaid = [" ".join(action.option_strings) for action in parser._actions
              if action.option_strings and action.nargs != 0 and not action.required
              and "default:" not in formatter._expand_help(action)]
    assert unsaid == []


@pytest.mark.parametrize("command", ["finetune", "eval", "predict", "bench", "info", "reproduce"])
def test_every_model_flag_names_hf_models(command):
    action = _commands()[1][command]._option_string_actions["--model"]
    assert "hf:<folder or hub name>" in action.help


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"skipkernels {__version__}\n"


# ---------------------------------------------------------------- flags never silently ignored

@pytest.mark.parametrize("argv", [["demo", "--epochs", "0"], ["predict", "x.jpg", "--batch-size", "0"],
                                  ["bench", "--batch", "0"], ["bench", "--classes", "0"],
                                  ["bench", "--epoch-images", "0"], ["bench", "--repeats", "0"]])
def test_a_zero_that_would_fall_back_to_the_default_is_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert f"{argv[-2]}: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_the_demo_refuses_an_unknown_mode_before_any_training(monkeypatch, capsys):
    import skipkernels.data.shapes as shapes
    monkeypatch.setattr(shapes, "ensure_shapes", lambda: pytest.fail("the demo started"))
    assert main(["demo", "--modes", "ft,skip,nope", "--out", "/nowhere"]) == 2
    assert capsys.readouterr().err.startswith("skipkernels demo: error: --modes: 'nope' is not a mode; choose from "
                                              "skip, lskip, cskip, ft, coop,")


def test_the_demo_default_shown_is_the_one_used():
    args = build_parser().parse_args(["demo"])
    assert args.epochs == DEMO["epochs"] == 20


@pytest.mark.parametrize("data,dataset,epochs", [
    ("/d/sun397", None, 2), ("/d/food-101", None, 2), ("/d/imagenet", None, 2),
    ("/d/sun397/split_zhou_SUN397.json", None, 2), ("/d/food-101/split_zhou_Food101.json", None, 2),
    ("/d", "Food-101", 2), ("/d/dtd", None, 8), ("/d/my_photos", None, 8), (None, None, 8)])
def test_protocol_epochs_reads_the_dataset_that_data_names(data, dataset, epochs):
    argv = ["finetune", "--epochs", "8", "--protocol-epochs"] + (["--data", data] if data else []) + \
        (["--dataset", dataset] if dataset else [])
    assert _configs(build_parser().parse_args(argv))[1].epochs == epochs


def test_bench_no_compile_leaves_out_every_compile_mode(monkeypatch):
    import skipkernels.bench as bench
    import skipkernels.bench_report as bench_report
    measured, reported = [], []
    monkeypatch.setattr(bench, "measure_time", lambda scenario, modes, *a: measured.extend(modes) or
                        {m: {"step_s": {}} for m in modes})
    monkeypatch.setattr(bench_report, "write", lambda results, *a: reported.append(results) or {})
    assert main(["bench", "--quick", "--no-memory", "--no-compile", "--device", "cpu",
                 "--modes", "skip-ref,skip-compile,skip-compile-graphs"]) == 0
    assert measured == ["skip-ref"] and list(reported[0]) == ["skip-ref"]


@pytest.mark.parametrize("main_rank", [True, False])
def test_finetune_prints_its_results_once_per_job(main_rank, monkeypatch, capsys):
    import skipkernels.distributed as distributed
    import skipkernels.train.job as job
    results = {"accuracy": {"hm": 50.0}, "zero_shot_accuracy": None, "gain": None, "time_s": {},
               "peak_train_memory_mb": None, "exact_savings": {}}
    monkeypatch.setattr(job, "finetune", lambda *a, **k: results)
    monkeypatch.setattr(distributed, "is_main", lambda: main_rank)
    assert main(["finetune", "--model", "skipkernels-tiny", "--data", "/d", "--out", "/nowhere"]) == 0
    out = capsys.readouterr().out
    if main_rank:
        assert json.loads(out.split("\nresults: ")[0])["accuracy"] == {"hm": 50.0}
        assert out.endswith("results: /nowhere/results.json\n")
    else:
        assert out == ""


@pytest.mark.parametrize("argv,target,said", [
    (["finetune", "--model", "skipkernels-tiny", "--out", "/nowhere"], "skipkernels.train.job.finetune",
     "skipkernels finetune: interrupted; the checkpoint of the last finished epoch, if any, is kept: the same "
     "command without --no-resume resumes from it"),
    (["info"], "skipkernels.info", "skipkernels info: interrupted"),
    (["demo", "--out", "/nowhere"], "skipkernels.data.shapes.ensure_shapes", "skipkernels demo: interrupted"),
])
def test_an_interruption_says_what_is_kept_where_something_is(argv, target, said, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(sys.modules[module] if module in sys.modules else __import__(module, fromlist=[name]),
                        name, interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines() == [said]


# ---------------------------------------------------------------- models: what the messages say

NO_TRANSFORMERS = """
import importlib.abc, io, json, sys, contextlib

class NoTransformers(importlib.abc.MetaPathFinder):  # as if transformers were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTransformers())
from skipkernels.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_hf_models_without_transformers_say_how_to_install_it(synthetic_root, tmp_path):
    image = next((synthetic_root / "synthetic" / "images").rglob("*.png"))
    model = ["--model", f"hf:{tmp_path / 'clip'}"]
    commands = [["finetune", *model, "--out", str(tmp_path / "run")],
                ["eval", "--data", str(synthetic_root), "--dataset", "synthetic", *model, "--no-progress"],
                ["predict", str(image), "--classes", "a,b", *model, "--no-progress"],
                ["info", *model]]
    proc = subprocess.run([sys.executable, "-c", NO_TRANSFORMERS, json.dumps(commands)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for argv, (code, err) in zip(commands, json.loads(proc.stdout.splitlines()[-1])):
        error = [line for line in err.splitlines() if ": error: " in line]
        assert code == 2 and len(error) == 1, (argv, err)
        assert error[0].startswith(f"skipkernels {argv[0]}: error: model hf:{tmp_path / 'clip'} needs the "
                                   "transformers package, which is not installed"), error
        assert error[0].endswith(": pip install 'skipkernels[hf]' (or pip install transformers)") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("model,weights,said", [
    ("skipkernels-tiny-siglip", "webli", "no pretrained weights ship for skipkernels-tiny-siglip, with open_clip "
                                         "or skipkernels"),
    ("skipkernels-tiny-eva02", "openai", "no pretrained weights ship for skipkernels-tiny-eva02"),
    ("skipkernels-tiny-shapes", "openai", "its shipped weights load when --pretrained is left out"),
    ("ViT-B-16", "no-such-tag", "open_clip's weights for ViT-B-16 are openai, "),
])
def test_weights_that_do_not_exist_are_named_as_such(model, weights, said, synthetic_root, tmp_path, capsys):
    assert main(["finetune", "--data", str(synthetic_root), "--dataset", "synthetic", "--model", model,
                 "--pretrained", weights, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    error = next(line for line in err.splitlines() if ": error: " in line)
    assert error.startswith(f"skipkernels finetune: error: could not load weights {weights!r} for {model}: no such "
                            "file, and ") and said in error
    assert error.endswith("Pass a local checkpoint file, or --pretrained none for random weights")
    assert "network" not in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["skipkernels-tiny", "skipkernels-tiny-siglip", "skipkernels-tiny-siglip2",
                                  "skipkernels-tiny-eva02", "skipkernels-tiny-shapes"])
def test_the_shipped_configs_tokenize_with_the_bpe_they_are_sized_for_offline(name, monkeypatch):
    """By name open_clip gives *-siglip SigLIP's sentencepiece vocabulary, fetched from the network
    at every use: the shipped configs (vocabulary 49,408) use open_clip's BPE tokenizer."""
    import open_clip.tokenizer

    from skipkernels.models import SHIPPED_CONFIGS, create_model, open_clip_module

    def no_network(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(open_clip.tokenizer.SigLipTokenizer, "__init__", no_network)
    assert name in SHIPPED_CONFIGS
    model, tokenizer = create_model(name, "none")
    texts = ["a photo of a red star.", "a photo of a dog."]
    bpe = open_clip_module().get_tokenizer("ViT-B-16", context_length=model.context_length)
    assert torch.equal(tokenizer(texts), bpe(texts)) and model.context_length == tokenizer(texts).shape[1]


OPEN_CLIP_LOADS_MODEL_PT = """
import sys
{imports}
import torch
for name, path, key, total in {checks!r}:
    model = open_clip.create_model(name, pretrained=path)
    assert float(model.state_dict()[key].double().sum()) == total, name
print("loaded", sorted(m for m in open_clip.list_models() if m.startswith("skipkernels-")))
"""


@pytest.mark.parametrize("imports", ["import open_clip, skipkernels",  # the README's order
                                     "import skipkernels\nassert 'open_clip' not in sys.modules\nimport open_clip"])
def test_open_clip_loads_a_runs_model_pt_of_a_shipped_config(imports, tmp_path):
    """The README: a plain model.pt loads with open_clip.create_model(name, pretrained="model.pt"),
    also for the shipped configs (skipkernels registers them with open_clip), in a fresh interpreter."""
    from skipkernels.models import SHIPPED_CONFIGS, create_model
    checks = []
    for name in ("skipkernels-tiny-shapes", "skipkernels-tiny-siglip"):
        model, _ = create_model(name, "none", seed=3)
        state = model.state_dict()
        key = next(k for k in state if k.endswith("weight") and "visual" in k)
        torch.save(state, tmp_path / f"{name}.pt")
        checks.append((name, str(tmp_path / f"{name}.pt"), key, float(state[key].double().sum())))
    code = OPEN_CLIP_LOADS_MODEL_PT.format(imports=imports, checks=checks)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(str(sorted(SHIPPED_CONFIGS)))


def test_skipkernels_imported_after_open_clip_registers_at_once(monkeypatch):
    import open_clip.factory as factory

    import skipkernels.models as models
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", [p for p in factory._MODEL_CONFIG_PATHS
                                                         if Path(p) != models.CONFIG_DIR])
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", {k: v for k, v in factory._MODEL_CONFIGS.items()
                                                    if k not in models.SHIPPED_CONFIGS})
    monkeypatch.setattr(models, "_registered", False)
    monkeypatch.setattr(models, "register_tiny_trunks", lambda: None)  # timm keeps them
    models.register_with_open_clip()  # what `import skipkernels` runs
    assert set(models.SHIPPED_CONFIGS) <= set(factory.list_models())


@pytest.mark.parametrize("main_rank", [True, False])
def test_open_clip_says_random_weights_once_per_job(main_rank, monkeypatch, caplog):
    import skipkernels.distributed as distributed
    from skipkernels.models import create_model
    monkeypatch.setattr(distributed, "is_main", lambda: main_rank)
    with caplog.at_level("WARNING"):
        create_model("skipkernels-tiny", "none")
    said = [r.getMessage() for r in caplog.records if "initialized randomly" in r.getMessage()]
    assert len(said) == (1 if main_rank else 0)


def test_data_parallel_warns_nothing(tmp_path):
    """torch 2.13 deprecates DDP's broadcast_buffers with a FutureWarning on every rank."""
    import torch.distributed as dist

    from skipkernels.distributed import data_parallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            wrapped = data_parallel(torch.nn.Linear(2, 2), torch.device("cpu"))
        assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
        assert not getattr(wrapped, "forward_sync_buffers", getattr(wrapped, "broadcast_buffers", True))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- a run's folder, reused

class EventsWriter:
    """Stands in for tensorboard's SummaryWriter: an events file per writer in its log_dir, one
    JSON line (tag, value, step) per scalar."""
    numbers = itertools.count()

    def __init__(self, log_dir):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(log_dir) / f"events.out.tfevents.{next(self.numbers)}", "w")

    def add_scalar(self, tag, value, step):
        self.file.write(json.dumps([tag, float(value), int(step)]) + "\n")

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


@pytest.fixture
def tensorboard(monkeypatch):
    import skipkernels.train.report as report
    monkeypatch.setattr(report, "summary_writer_class", lambda: EventsWriter)


def _events(run) -> list[tuple]:
    return [tuple(json.loads(line)) for path in sorted((run / "tensorboard").glob("events.out.tfevents.*"))
            for line in path.read_text().splitlines()]


def _tagged(events, tag) -> list[tuple]:
    return [(step, value) for t, value, step in events if t == tag]


def _metrics(run) -> list[tuple]:
    lines = (run / "metrics.csv").read_text().splitlines()[1:]
    return [(int(row.split(",")[0]), float(row.split(",")[2])) for row in lines]


def _finetune(root, run, *extra, capsys=None):
    code = main(["finetune", "--data", str(root), "--dataset", "synthetic", *TINY, "--out", str(run), *extra])
    return code, capsys.readouterr().err if capsys is not None else None


def test_tensorboard_logs_the_accuracies_and_a_fresh_start_leaves_no_old_events(synthetic_root, tmp_path,
                                                                                 tensorboard, capsys):
    run = tmp_path / "run"
    assert _finetune(synthetic_root, run, "--epochs", "2", "--zero-shot", "--report-to", "tensorboard",
                     capsys=capsys)[0] == 0
    results = json.loads((run / "results.json").read_text())
    events = _events(run)
    assert _tagged(events, "train/loss") == _metrics(run) and len(_metrics(run)) == 2 * STEPS_PER_EPOCH
    for group in ("base", "new", "hm"):  # what training.png draws: zero-shot at 0, the final at the end
        assert _tagged(events, f"zero_shot/{group}") == [(0, pytest.approx(results["zero_shot_accuracy"][group]))]
        assert _tagged(events, f"eval/{group}") == [(2 * STEPS_PER_EPOCH, pytest.approx(results["accuracy"][group]))]

    # another run into the same folder, started over: only its own steps and accuracies remain
    code, err = _finetune(synthetic_root, run, "--epochs", "1", "--lr", "1e-3", "--no-resume", "--report-to",
                          "tensorboard", capsys=capsys)
    assert code == 0 and "removed the earlier run's" in err and "tensorboard/" in err
    events = _events(run)
    assert _tagged(events, "train/loss") == _metrics(run) and len(_metrics(run)) == STEPS_PER_EPOCH
    assert not _tagged(events, "zero_shot/hm")
    assert _tagged(events, "eval/hm") == [(STEPS_PER_EPOCH, pytest.approx(
        json.loads((run / "results.json").read_text())["accuracy"]["hm"]))]

    # the same run again, finished: nothing to do, and --zero-shot is said not to be applied
    code, err = _finetune(synthetic_root, run, "--epochs", "1", "--lr", "1e-3", "--zero-shot", capsys=capsys)
    assert code == 0 and "finished: nothing to do" in err
    assert "--zero-shot is not applied: the run finished without a zero-shot evaluation" in err

    # started over without a logger: no log of an earlier run is left beside the new results
    code, err = _finetune(synthetic_root, run, "--epochs", "1", "--no-resume", capsys=capsys)
    assert code == 0 and not (run / "tensorboard").exists()


def test_an_interrupted_run_resumes_saying_so_and_logs_each_step_once(synthetic_root, tmp_path, tensorboard,
                                                                      monkeypatch, capsys):
    import skipkernels.train.trainer as trainer
    set_lr = trainer.set_epoch_lr

    def interrupt_at_epoch_2(optimizer, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt  # Ctrl-C while epoch 2 starts
        return set_lr(optimizer, epoch, *args)

    run = tmp_path / "run"
    monkeypatch.setattr(trainer, "set_epoch_lr", interrupt_at_epoch_2)
    code, err = _finetune(synthetic_root, run, "--epochs", "2", capsys=capsys)
    assert code == 130 and "interrupted; the checkpoint of the last finished epoch" in err
    assert (run / "checkpoint.pt").is_file() and not (run / "tensorboard").exists()

    # resumed with a logger (not part of the run's identity): it gets the steps before the resume too
    monkeypatch.setattr(trainer, "set_epoch_lr", set_lr)
    code, err = _finetune(synthetic_root, run, "--epochs", "2", "--report-to", "tensorboard", capsys=capsys)
    assert code == 0  # --no-progress: no bar shows the resumed epoch, the line does
    assert f"resuming from {run / 'checkpoint.pt'}: 1 of 2 epochs done (--no-resume starts over)" in err.splitlines()
    events = _events(run)
    assert _tagged(events, "train/loss") == _metrics(run) and len(_metrics(run)) == 2 * STEPS_PER_EPOCH
    assert [step for step, _ in _tagged(events, "train/epoch_loss")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert json.loads((run / "results.json").read_text())["resumed"]
