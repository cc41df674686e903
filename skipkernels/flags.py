"""Flags every training command checks before the data or the model is loaded: the device, the
kernel policy, autocast, reporting, the model's package. Shared by ``finetune`` and ``reproduce``.
Also the help of the flags several commands share."""
from __future__ import annotations

import argparse
import sys

from skipkernels.models import HF_PREFIX, SHIPPED_CONFIGS, SHIPPED_WEIGHTS

MODEL_HELP = (f"an open_clip model name; a config shipped with skipkernels: {', '.join(SHIPPED_WEIGHTS)} (pretrained) "
              f"or {', '.join(n for n in SHIPPED_CONFIGS if n not in SHIPPED_WEIGHTS)} (random weights); or "
              f"{HF_PREFIX}<folder or hub name> (a transformers CLIPModel, SiglipModel or Siglip2Model)")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda where available, else cpu)"
NO_PROGRESS_HELP = "disable progress bars"


def positive_int(text: str) -> int:
    """argparse type of a count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# The start of SkipConfig's FutureWarning for top_ratio above 1 (a count), as a warnings filter.
TOP_RATIO_COUNT_WARNING = r"top_ratio=\S+ above 1 is a count of classes"


def note_top_ratio_count(args) -> None:
    """--top-ratio above 1, the older spelling of a count of classes: one line on stderr saying to
    use --top-count, in place of Python's FutureWarning (two lines, repeated by each config the
    run rebuilds). Call it before the configs are built."""
    ratio = getattr(args, "top_ratio", None)
    if ratio is None or ratio <= 1 or getattr(args, "top_count", None) is not None:
        return  # a share; or both flags given, which SkipConfig refuses
    import math
    import warnings
    print(f"skipkernels {args.command}: note: --top-ratio {ratio:g} above 1 is a count of classes: use --top-count "
          f"{math.ceil(ratio)}, which keeps the same classes", file=sys.stderr)
    warnings.filterwarnings("ignore", message=TOP_RATIO_COUNT_WARNING, category=FutureWarning)


def kernel_policy(args, train):
    """The run's KernelPolicy: --backend and --kernel-table."""
    from skipkernels.ops.policy import KernelPolicy
    from skipkernels.options import from_args
    return from_args(KernelPolicy, args)


def flag_device(name):
    """--device of every command, checked before any work: cpu, cuda or cuda:N where that GPU is
    there (default: cuda where available, else cpu)."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_autocast(device, dtype) -> None:
    """--amp: ValueError where torch's autocast cannot run ``dtype`` on ``device`` (it would
    otherwise warn and run in fp32, or fail at the first step)."""
    import warnings

    import torch
    if dtype is None:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.autocast(device.type, dtype=dtype)
        except RuntimeError as err:
            caught.append(warnings.WarningMessage(str(err), RuntimeWarning, "", 0))
    refused = [str(w.message) for w in caught if "not supported" in str(w.message)]
    if refused:
        raise ValueError(f"--amp {str(dtype).removeprefix('torch.')}: autocast on {device.type} does not support it "
                         f"({refused[0].splitlines()[-1]}); use --amp none or another dtype")


def check_training_flags(args, train, policy) -> None:
    """Every flag that cannot work on this machine fails here, before the data or the model is
    loaded: --device, --backend, --kernel-table, --amp, --report-to, --model hf:... without transformers."""
    from skipkernels.models import import_transformers
    from skipkernels.ops.measured import check_table
    from skipkernels.ops.policy import check_runnable
    from skipkernels.train.report import check_report_to
    from skipkernels.train.trainer import autocast_dtype_for
    device = flag_device(args.device)
    check_runnable(policy, device)  # --backend
    check_table(policy.table)  # --kernel-table
    check_autocast(device, autocast_dtype_for(train.amp, device))
    check_report_to(train.report_to)
    if (args.model or "").startswith(HF_PREFIX):
        import_transformers(args.model.removeprefix(HF_PREFIX))
