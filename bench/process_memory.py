"""Peak memory of a process and all its children (a vLLM server and its engine-core processes).

CPU: the sum of resident set sizes over the process tree, polled. CUDA: the GPU memory NVML charges to
those processes (what `nvidia-smi` shows per process), polled too. Polling can miss a peak shorter than
the interval; the interval (0.2 s) is far shorter than any phase of serving that allocates memory.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import psutil


@dataclass
class MemoryPeaks:
    """Bytes: peaks over the whole life, and the level once the server was ready (before any load)."""

    peak_rss: int = 0
    ready_rss: int | None = None
    peak_gpu: int | None = None
    ready_gpu: int | None = None


def total_rss(processes: list[psutil.Process]) -> int:
    """Resident bytes of `processes` (those that exited meanwhile count 0)."""
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += process.memory_info().rss
    return total


class _GpuMemory:
    """GPU bytes NVML charges to a set of pids, summed over the cards; absent without NVML or a GPU."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no pynvml, no driver or no card: memory is CPU-only
            self._nvml, self._handles = None, []

    @property
    def available(self) -> bool:
        return bool(self._handles)

    def used_by(self, pids: set[int]) -> int:
        total = 0
        for handle in self._handles:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
        return total


class PeakMemorySampler:
    """Polls a process tree's memory in a background thread until `stop()`."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.peaks = MemoryPeaks()
        self._root = psutil.Process(pid)
        self._interval = interval
        self._gpu = _GpuMemory()
        if self._gpu.available:
            self.peaks.peak_gpu = 0
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"memory-{pid}", daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int | None]:
        tree = [self._root, *self._root.children(recursive=True)]
        gpu = self._gpu.used_by({p.pid for p in tree}) if self._gpu.available else None
        return total_rss(tree), gpu

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                rss, gpu = self._sample()
            except psutil.Error:  # the root exited
                return
            with self._lock:
                self.peaks.peak_rss = max(self.peaks.peak_rss, rss)
                if gpu is not None:
                    self.peaks.peak_gpu = max(self.peaks.peak_gpu or 0, gpu)
            self._stopped.wait(self._interval)

    def mark_ready(self) -> None:
        """Record the level now (the server loaded, no requests yet)."""
        rss, gpu = self._sample()
        with self._lock:
            self.peaks.ready_rss, self.peaks.ready_gpu = rss, gpu
            self.peaks.peak_rss = max(self.peaks.peak_rss, rss)

    def stop(self) -> MemoryPeaks:
        self._stopped.set()
        self._thread.join()
        return self.peaks
