"""A `lape-awq serve` process for one benchmark configuration (server/serve_process.py), with the memory
of its process tree sampled from spawn on."""

from __future__ import annotations

from pathlib import Path

from lape_awq.bench.process_memory import MemoryPeaks, PeakMemorySampler
from lape_awq.server.serve_process import ServeProcess


class ServerProcess(ServeProcess):
    """`lape-awq serve --model NAME=CHECKPOINT` on a free loopback port, its memory sampled from spawn on."""

    def __init__(self, name: str, checkpoint: Path, serve_args: list[str], log: Path) -> None:
        super().__init__([(name, checkpoint)], ["--quiet", *serve_args], log)
        self.name = name
        self.url = f"{self.root}/v1"
        self.memory = PeakMemorySampler(self.process.pid)

    def wait_ready(self, timeout: float) -> str | None:
        reason = super().wait_ready(timeout)
        if reason is None:
            self.memory.mark_ready()
        return reason

    def stop(self, timeout: float = 60.0) -> MemoryPeaks:  # type: ignore[override]
        """Stops the server; returns the memory peaks."""
        peaks = self.memory.stop()
        super().stop(timeout)
        return peaks
