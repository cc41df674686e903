"""What a training run reports while it runs: ``metrics.csv``, appended every epoch, and the same
numbers in TensorBoard with ``report_to="tensorboard"`` (``--report-to``, the Hugging Face
Trainer's convention; tensorboard is an optional dependency)."""
from __future__ import annotations

import shutil
from pathlib import Path

from skipkernels._compat import install_hint
from skipkernels.errors import MissingDependency
from skipkernels.plots import write_metrics_csv

REPORT_TO = (None, "tensorboard")  # None: metrics.csv only ("none" on the command line)
METRICS_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"  # under the run's folder


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; MissingDependency without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingDependency("report_to 'tensorboard' (--report-to tensorboard) needs the tensorboard package, "
                                f"which is not installed ({err}): {install_hint('tensorboard')}, or report to none") \
            from err
    return SummaryWriter


def check_report_to(report_to) -> None:
    """ValueError for a value outside ``REPORT_TO``; MissingDependency where its package is missing."""
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {REPORT_TO}, got {report_to!r}")
    if report_to == "tensorboard":
        summary_writer_class()


class RunLog:
    """The numbers of a run as it trains, in ``out_dir``.

    ``metrics.csv`` (one row per step, ``plots.METRICS_COLUMNS``) is written from the steps so far
    when training starts (a resumed run's included) and appended, flushed, after every epoch, so a
    long run can be watched. With ``report_to="tensorboard"`` the same numbers go to
    ``out_dir/tensorboard``: each step's loss and learning rate, each epoch's mean loss and, where
    the epoch was evaluated, its test accuracies, all at the global step. That folder is written
    afresh from ``steps`` and ``history`` (the checkpoint's) when training starts, so it holds this
    run's numbers once each: none of an earlier run's, none logged twice by a resumed one.
    """

    def __init__(self, out_dir, report_to=None, steps=(), history=()):
        check_report_to(report_to)
        out_dir = Path(out_dir)
        self.path = out_dir / METRICS_NAME
        steps = list(steps)
        write_metrics_csv(steps, self.path)
        self.writer = None
        if report_to == "tensorboard":
            shutil.rmtree(out_dir / TENSORBOARD_DIR, ignore_errors=True)
            self.writer = summary_writer_class()(log_dir=str(out_dir / TENSORBOARD_DIR))
            for record in history:
                epoch_steps = [s for s in steps if s["epoch"] == record["epoch"]]
                if epoch_steps:  # a checkpoint from before the step log has none
                    self._log_epoch(epoch_steps, record)
            self.writer.flush()

    def epoch_done(self, steps: list[dict], record: dict) -> None:
        """The epoch's ``steps`` and its history ``record`` (epoch, loss, accuracy if evaluated)."""
        write_metrics_csv(steps, self.path, append=True)
        if self.writer is None:
            return
        self._log_epoch(steps, record)
        self.writer.flush()

    def _log_epoch(self, steps: list[dict], record: dict) -> None:
        for s in steps:
            self.writer.add_scalar("train/loss", s["loss"], s["step"])
            self.writer.add_scalar("train/lr", s["lr"], s["step"])
        step = steps[-1]["step"] if steps else 0
        self.writer.add_scalar("train/epoch_loss", record["loss"], step)
        for name, value in (record.get("accuracy") or {}).items():
            self.writer.add_scalar(f"eval/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def log_run_accuracies(out_dir, report_to, zero_shot: dict | None, final: dict | None, last_step: int) -> None:
    """The accuracies evaluated around training, which training.png draws too, to ``report_to``'s
    logger: the model before training (``zero_shot/<group>``, at step 0) and the tuned one
    (``eval/<group>`` at ``last_step``, where the curve of the epochs' evaluations ends). After
    training: the log that training wrote afresh (``RunLog``) gets them once."""
    if report_to != "tensorboard" or not (zero_shot or final):
        return
    writer = summary_writer_class()(log_dir=str(Path(out_dir) / TENSORBOARD_DIR))
    try:
        for name, value in (zero_shot or {}).items():
            writer.add_scalar(f"zero_shot/{name}", value, 0)
        for name, value in (final or {}).items():
            writer.add_scalar(f"eval/{name}", value, last_step)
    finally:
        writer.close()
