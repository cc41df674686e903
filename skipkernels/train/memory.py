"""Peak memory of a phase: the allocator's peak on CUDA, and on CPU the allocator's peak over a
few steps read from torch.profiler's allocation events."""
from __future__ import annotations

import contextlib
import os
import time

import torch


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes``: CUDA's max allocated memory
    over the block, and ``m.start_bytes`` allocated at entry (CPU phases use CpuAllocatorPeak)."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"PeakMemory reads the CUDA allocator; for {self.device} use CpuAllocatorPeak")
        self.peak_bytes = self.start_bytes = 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start_bytes = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        return False


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ layers print start/stop lines and a warning straight to file descriptor
    2; they say nothing about the run, so they are dropped while it starts and runs."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CpuAllocatorPeak:
    """The most bytes the CPU allocator held between ``start()`` and ``stop()``, above the level at
    ``start()``: the running sum of every allocation and free that torch.profiler records with
    ``profile_memory=True``. Blocks allocated before the window (the weights) do not count, and
    their frees inside it are not recorded. ``peak_bytes`` stays None where the profiler's event
    list is unavailable. ``overhead_s``: time spent starting, stopping and reading the profiler,
    for the caller to leave out of its timings.

    As a context manager the window opens on entry and closes on exit or, when ``steps`` is
    given, at the ``steps``-th ``step_done()``: a few steps hold the steady state of training
    (gradients, optimizer state, activations) without the profiler slowing a whole epoch.
    """

    def __init__(self, steps: int | None = None, keep_trace: bool = False):
        self.steps = steps
        self.keep_trace = keep_trace
        self.peak_bytes: int | None = None
        self.trace: list | None = None  # with keep_trace: (time ns, bytes) of each allocation (> 0) and free (< 0)
        self.overhead_s = 0.0
        self._done = 0
        self._profiler = None
        self._quiet = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def step_done(self) -> None:
        self._done += 1
        if self.steps is not None and self._done == self.steps:
            self.stop()

    def start(self) -> None:
        begin = time.perf_counter()
        self._quiet = _stderr_silenced()
        self._quiet.__enter__()
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        try:
            profiler.__enter__()
        except BaseException:
            self._quiet.__exit__(None, None, None)  # never leave stderr silenced
            raise
        self._profiler = profiler
        self.overhead_s += time.perf_counter() - begin

    def stop(self) -> None:
        """Ends the window (again: nothing) and reads the peak."""
        if self._profiler is None:
            return
        begin = time.perf_counter()
        try:
            self._profiler.__exit__(None, None, None)
        finally:
            self._quiet.__exit__(None, None, None)
        try:
            events = self._profiler.profiler.kineto_results.events()
        except AttributeError:  # a torch without this (internal) event list: no figure rather than a guess
            events = None
        self._profiler = None
        if events is not None:
            allocations = sorted(((e.start_ns(), e.nbytes()) for e in events
                                  if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU),
                                 key=lambda pair: pair[0])
            held = peak = 0
            for _, nbytes in allocations:  # nbytes < 0 for a free
                held += nbytes
                peak = max(peak, held)
            self.peak_bytes = peak
            if self.keep_trace:
                self.trace = allocations
        self.overhead_s += time.perf_counter() - begin
