"""A benchmark configuration's server process (ours or a peer's, bench/peers.py), with the memory of its
process tree sampled from spawn on."""

from __future__ import annotations

from lape_awq.bench.process_memory import MemoryPeaks, PeakMemorySampler
from lape_awq.server.serve_process import ChildServer


class MeasuredServer:
    """`server`, serving its model as `name` at `url`, its memory sampled from spawn on."""

    def __init__(self, name: str, server: ChildServer) -> None:
        self.name = name
        self.server = server
        self.url = f"{server.root}/v1"
        self.memory = PeakMemorySampler(server.process.pid)

    def wait_ready(self, timeout: float) -> str | None:
        reason = self.server.wait_ready(timeout)
        if reason is None:
            self.memory.mark_ready()
        return reason

    def pause(self) -> None:
        self.server.pause()

    def resume(self) -> None:
        self.server.resume()

    def stop(self, timeout: float = 60.0) -> MemoryPeaks:
        """Stops the server; returns the memory peaks."""
        peaks = self.memory.stop()
        self.server.stop(timeout)
        return peaks
