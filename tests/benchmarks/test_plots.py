"""Pictures of runs: metrics.csv and training.png from finetune, the bench chart, no matplotlib."""
import csv
import sys

import pytest
from PIL import Image

from skipkernels import bench_report
from skipkernels.cli import _demo_chart
from skipkernels.plots import METRICS_COLUMNS, bar_chart, training_chart, write_metrics_csv
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.trainer import TrainConfig
from skipkernels.train.job import finetune

FAST = dict(batch_size=8, lr=3e-3, lr_image=3e-3, shots=8, same_class_batches=False, warmup_epochs=1,
            progress=False)
STEPS_PER_EPOCH = 6 * 8 // 8  # 6 base classes x 8 shots, batches of 8


def _rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _valid_png(path):
    with Image.open(path) as img:
        img.verify()  # a truncated or corrupt file raises
    with Image.open(path) as img:
        return img.format, img.size


def test_finetune_writes_metrics_csv_and_training_png(synthetic_root, tmp_path):
    skip, train = SkipConfig(mode="skip", skip_layers=2), TrainConfig(epochs=2, **FAST)
    straight = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip,
                        train=TrainConfig(epochs=2, eval_every=1, **FAST), out_dir=tmp_path / "straight",
                        zero_shot=True)
    assert set(straight["history"][0]["accuracy"]) == {"base", "new", "hm"}  # evaluated after epoch 1
    assert "accuracy" not in straight["history"][1]  # the last epoch's is the run's accuracy
    columns, rows = _rows(tmp_path / "straight" / "metrics.csv")
    assert tuple(columns) == METRICS_COLUMNS
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [int(r["epoch"]) for r in rows] == [1] * STEPS_PER_EPOCH + [2] * STEPS_PER_EPOCH
    assert {float(r["lr"]) for r in rows[:STEPS_PER_EPOCH]} == {1e-6}  # the warm-up epoch
    assert float(rows[-1]["lr"]) == pytest.approx(3e-3)
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times) and times[0] > 0
    fmt, (width, height) = _valid_png(tmp_path / "straight" / "training.png")
    assert fmt == "PNG" and width > 2.5 * height  # three panels side by side: loss, lr, accuracy

    # an interrupted and resumed run without evaluations logs the same steps: the log travels in
    # the checkpoint, and evaluating between epochs leaves training unchanged
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip,
             train=TrainConfig(epochs=2, stop_after_epochs=1, **FAST), out_dir=tmp_path / "resumed")
    assert len(_rows(tmp_path / "resumed" / "metrics.csv")[1]) == STEPS_PER_EPOCH
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=skip, train=train, out_dir=tmp_path / "resumed")
    resumed = _rows(tmp_path / "resumed" / "metrics.csv")[1]
    assert [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in resumed] == \
        [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in rows]


def test_bench_chart_is_a_matplotlib_png(tmp_path):
    results = {"ft": {"step_s": {"median": 0.035}, "memory": {"peak_mb": 12.0}},
               "skip-ref": {"step_s": {"median": 0.012}, "memory": {"peak_mb": 0.2}},
               "skip-graph": {"skipped": "CUDA graphs need a GPU"}}
    assert bench_report.chart(results, tmp_path / "e2e.png", "cpu: test")
    fmt, (width, height) = _valid_png(tmp_path / "e2e.png")
    assert fmt == "PNG" and width > height


def test_demo_chart_compares_the_modes(tmp_path):
    def row(mode, hm, train_s, peak_mb, params):
        return {"mode": mode, "dataset": "synthetic", "model": "skipkernels-tiny", "device": "cpu",
                "accuracy": {"hm": hm}, "zero_shot_accuracy": {"hm": 17.0}, "trainable_params": params,
                "time_s": {"train": train_s, "cache": 0.5}, "peak_train_memory_mb": peak_mb}

    assert _demo_chart([row("ft", 74.2, 3.6, 72.0, 3_588_928), row("skip", 71.8, 1.3, 2.8, 208_384)],
                       tmp_path / "four.png")
    assert _demo_chart([row("ft", 74.2, 3.6, None, 3_588_928), row("skip", 71.8, 1.3, None, 208_384)],
                       tmp_path / "three.png")  # memory not measured: no memory panel
    (_, four), (_, three) = _valid_png(tmp_path / "four.png"), _valid_png(tmp_path / "three.png")
    assert four[0] > three[0]


def test_without_matplotlib_charts_are_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    steps = [{"step": 1, "epoch": 1, "loss": 2.0, "lr": 0.1, "time_s": 0.5}]
    write_metrics_csv(steps, tmp_path / "metrics.csv")
    assert not training_chart(steps, [], tmp_path / "training.png", "t")
    assert not bench_report.chart({"ft": {"step_s": {"median": 0.1}}}, tmp_path / "e2e.png", "t")
    assert not (tmp_path / "training.png").exists() and not (tmp_path / "e2e.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    hint = "(pip install 'skipkernels[plots]' (or pip install matplotlib))"
    assert err == [f"matplotlib is not installed: training.png not drawn {hint}",
                   f"matplotlib is not installed: e2e.png not drawn {hint}"]
    assert _rows(tmp_path / "metrics.csv")[1][0]["loss"] == "2.0"


def test_metrics_csv_grows_every_epoch_and_tensorboard_logs_the_same(synthetic_root, tmp_path, monkeypatch):
    """A long run can be watched: after each epoch metrics.csv holds its steps; with
    report_to="tensorboard" the same numbers go to the writer (a stand-in records them)."""
    import skipkernels.train.report as report
    import skipkernels.train.trainer as trainer
    logged, seen_at_epoch = [], {}

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            logged.append((tag, float(value), int(step)))

        def flush(self):
            pass

        def close(self):
            logged.append(("closed", 0.0, 0))

    monkeypatch.setattr(report, "summary_writer_class", lambda: Writer)
    set_lr = trainer.set_epoch_lr

    def spy(optimizer, epoch, *args):  # called as each epoch starts: the file as it is then
        path = tmp_path / "run" / "metrics.csv"
        seen_at_epoch[epoch] = len(_rows(path)[1]) if path.is_file() else None
        return set_lr(optimizer, epoch, *args)

    monkeypatch.setattr(trainer, "set_epoch_lr", spy)
    finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(skip_layers=2),
             train=TrainConfig(epochs=3, eval_every=2, report_to="tensorboard", **FAST), out_dir=tmp_path / "run")
    assert seen_at_epoch == {0: 0, 1: STEPS_PER_EPOCH, 2: 2 * STEPS_PER_EPOCH}
    rows = _rows(tmp_path / "run" / "metrics.csv")[1]
    losses = [(float(r["loss"]), int(r["step"])) for r in rows]
    assert [(v, s) for tag, v, s in logged if tag == "train/loss"] == losses
    assert [s for tag, _, s in logged if tag == "train/epoch_loss"] == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    assert {tag for tag, _, s in logged if tag.startswith("eval/") and s == 2 * STEPS_PER_EPOCH} == \
        {"eval/base", "eval/new", "eval/hm"}  # the evaluated epoch's accuracies
    assert logged[-1][0] == "closed"


def test_an_all_classes_run_reports_all(synthetic_root, tmp_path):
    result = finetune(synthetic_root, "synthetic", "skipkernels-tiny", skip=SkipConfig(skip_layers=2),
                      train=TrainConfig(epochs=1, **FAST), out_dir=tmp_path / "all", base_to_new=False)
    assert set(result["accuracy"]) == {"all"}


def _drawn(monkeypatch):
    """The figures the charts would save, kept for inspection."""
    import skipkernels.plots as plots
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    return figures


STEPS = [{"step": s, "epoch": 1 + (s > 2), "loss": 2.0 / s, "lr": 0.1, "time_s": s} for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("evaluations,title", [
    ([{"epoch": 0, "hm": 10.0}, {"epoch": 2, "hm": 50.0}], "test accuracy (epoch 0: zero-shot)"),
    ([{"epoch": 1, "hm": 30.0}, {"epoch": 2, "hm": 50.0}], "test accuracy"),  # no zero-shot point drawn
    ([{"epoch": 2, "all": 50.0}], "test accuracy"),
])
def test_the_accuracy_panels_title_says_zero_shot_only_when_it_draws_it(tmp_path, monkeypatch, evaluations, title):
    figures = _drawn(monkeypatch)
    assert training_chart(STEPS, evaluations, tmp_path / "training.png", "t")
    (figure,) = figures
    panel = figure.axes[2]
    assert panel.get_title() == title
    assert [list(line.get_xdata()) for line in panel.get_lines()][0] == [e["epoch"] for e in evaluations]


@pytest.mark.parametrize("share_y", [True, False])
def test_bar_chart_shares_the_y_scale_when_asked_and_marks_named_bars(tmp_path, monkeypatch, share_y):
    figures = _drawn(monkeypatch)
    panels = [("a", {"x": 10.0, "y": 20.0}), ("b", {"x": 90.0, "y": 80.0})]
    assert bar_chart(panels, tmp_path / "c.png", "t", share_y=share_y, markers=[{"y": 25.0, "absent": 1.0}, None],
                     marker_label="paper")
    (figure,) = figures
    left, right = figure.axes[:2]
    assert (left.get_ylim() == right.get_ylim()) is share_y
    (marks,) = left.collections  # one mark, on bar "y" (a name without a bar gets none)
    assert [float(v) for v in marks.get_offsets()[:, 1]] == [25.0]
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["paper"]
    assert not right.collections and right.get_legend() is None
