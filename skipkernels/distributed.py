"""torch.distributed helpers: started by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the
environment), gloo on CPU, NCCL on GPUs. Everything degrades to a no-op in a single process."""
from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device | None) -> torch.device:
    """Join the process group torchrun describes (if any); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel on this rank's ``device``, its buffers not broadcast
    before every forward: they are constants (attention masks, position ids), equal on every rank.
    torch >= 2.13 names that ``forward_sync_buffers=False`` and deprecates ``broadcast_buffers``
    with a FutureWarning per rank; that one syncs the buffers once at start too, a no-op here."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def barrier() -> None:
    if enabled():
        dist.barrier()


def split_batch(indices: list[int]) -> tuple[int, int]:
    """[start, end) of this rank's share of a global batch: sizes differ by at most one."""
    n, world, r = len(indices), world_size(), rank()
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def gather_batch(features: torch.Tensor, labels: torch.Tensor):
    """All ranks' (features, labels) of a step, concatenated in rank order, and this rank's
    offset in them. No autograd: used for the class selection only."""
    if not enabled():
        return features, labels, 0
    world = world_size()
    size = torch.tensor([features.shape[0]], device=features.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    pad_f = features.new_zeros((longest - features.shape[0],) + tuple(features.shape[1:]))
    pad_l = labels.new_zeros((longest - labels.shape[0],))
    all_f = [torch.empty((longest,) + tuple(features.shape[1:]), dtype=features.dtype, device=features.device)
             for _ in range(world)]
    all_l = [torch.empty(longest, dtype=labels.dtype, device=labels.device) for _ in range(world)]
    dist.all_gather(all_f, torch.cat([features.detach(), pad_f]))
    dist.all_gather(all_l, torch.cat([labels, pad_l]))
    feats = torch.cat([f[:n] for f, n in zip(all_f, sizes)])
    labs = torch.cat([lab[:n] for lab, n in zip(all_l, sizes)])
    return feats, labs, sum(sizes[:rank()])


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if enabled():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
