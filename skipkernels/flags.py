"""Flags every training command checks before the data or the model is loaded: the device, the
kernel policy, autocast, reporting. Shared by ``finetune`` and ``reproduce``."""
from __future__ import annotations


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
    loaded: --device, --backend, --kernel-table, --amp, --report-to."""
    from skipkernels.ops.measured import check_table
    from skipkernels.ops.policy import check_runnable
    from skipkernels.train.report import check_report_to
    from skipkernels.train.trainer import autocast_dtype_for
    device = flag_device(args.device)
    check_runnable(policy, device)  # --backend
    check_table(policy.table)  # --kernel-table
    check_autocast(device, autocast_dtype_for(train.amp, device))
    check_report_to(train.report_to)
