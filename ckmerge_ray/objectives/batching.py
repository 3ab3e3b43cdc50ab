"""Device-aware batch sizes, out-of-memory recovery and per-evaluation accounting.

Shared by the objectives: what one evaluation cost (seconds, peak memory) and how many windows or
requests go into one forward pass.

- `fit_batch`: on a GPU, the windows per pass that the free memory holds, from two measured
  passes (1 and 2 windows: the slope is the per-window memory, the rest is fixed).
- `halving`: runs a batched evaluation; on out-of-memory it halves the batch size and starts the
  evaluation over, each size tried once, down to 1 (then the error propagates).
- `PeakMemory`: memory an evaluation used above what was allocated when it began. On CUDA,
  ``torch.cuda.max_memory_allocated`` (the peak counter is reset at the start). On CPU, the
  process's resident set: the larger of its kernel high-water mark (``VmHWM``, when the
  evaluation raised it) and the RSS polled every millisecond by a thread, minus the RSS at the
  start, which is taken after ``malloc_trim`` has handed glibc's freed pages back (otherwise an
  evaluation reusing the previous one's freed heap would show no growth). The high-water mark is
  never reset (it is the worker's ``rss_peak_mb``), so a spike shorter than a millisecond below
  an earlier peak can be missed.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
from typing import Callable, Optional, Tuple, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Share of the free device memory the measured batch may fill (allocator fragmentation, the
#: evaluation library's own buffers).
GPU_MEMORY_SHARE = 0.8
#: Tokens per pass on CPU: on 2 cores (BENCHMARKS.md, "Evaluation throughput") throughput rises up
#: to 8 windows of 512 tokens and flattens there (16: +9 % per CPU-second, -14 % wall-clock).
CPU_TOKENS_PER_PASS = 4096


def is_oom(error: BaseException) -> bool:
    """Out of memory on any device: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text or "out of memory" in text)


def free_cached(device: torch.device) -> None:
    """Give back what a failed pass left: its tensors (collected) and the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def halving(run: Callable[[int], T], batch: int, device: torch.device,
            what: str = "evaluation") -> Tuple[T, int]:
    """``(run(size), size)`` for the first size in batch, batch // 2, ..., 1 that does not run
    out of memory. `run` must start its evaluation over: a half-done one is thrown away, so the
    score never mixes batch sizes."""
    while True:
        try:
            return run(batch), batch
        except Exception as e:  # noqa: BLE001 - filtered just below
            if not is_oom(e) or batch <= 1:
                raise
            log.warning("%s ran out of memory at batch size %d; retrying at %d: %s",
                        what, batch, batch // 2, str(e).splitlines()[0][:200])
        # outside the except block: the traceback, and the tensors its frames hold, are gone
        free_cached(device)
        batch //= 2


def cpu_batch(seq_len: int) -> int:
    """Windows per pass on CPU: CPU_TOKENS_PER_PASS tokens, at least one window."""
    return max(1, CPU_TOKENS_PER_PASS // seq_len)


def fit_batch(run: Callable[[int], object], device: torch.device, limit: int,
              share: float = GPU_MEMORY_SHARE) -> int:
    """Windows per pass that fit on a CUDA `device`: peak memory of run(1) and run(2) gives the
    fixed and per-window parts; the batch fills `share` of the memory free now (what the driver
    reports free plus what PyTorch's cache holds unused), capped at `limit`."""
    peaks = []
    for n in (1, 2):
        with PeakMemory(device) as peak:
            run(n)
        peaks.append(peak.bytes)
    per_window = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_window, 0)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    batch = int((free * share - fixed) // per_window)
    log.info("evaluation batch: %d windows (%.0f MiB each, %.0f MiB fixed, %.0f MiB free)",
             batch, per_window / 2**20, fixed / 2**20, free / 2**20)
    return max(1, min(batch, limit))


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` / ``peak.mb``: the memory
    the block used above what was in use when it began (see the module docstring)."""

    POLL_S = 0.001

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._polled = 0

    @property
    def mb(self) -> float:
        return self.bytes / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = self._polled = _rss()
            self._hwm = _hwm()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._polled = max(self._polled, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        peak = max(self._polled, _rss())
        hwm = _hwm()
        if hwm > self._hwm:  # the evaluation set a new process-wide high: exact
            peak = max(peak, hwm)
        self.bytes = max(0, peak - self._base)


class Stopwatch:
    """Wall seconds of a block, with the device's queued work finished at both ends."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def _malloc_trim() -> None:
    """Hand glibc's freed heap pages back to the OS (nothing elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """Resident bytes of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _hwm() -> int:
    """Peak resident bytes of this process so far (VmHWM; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0
