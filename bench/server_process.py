"""A `lape-awq serve` process for one benchmark configuration: started, waited for, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lape_awq.bench.process_memory import MemoryPeaks, PeakMemorySampler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`lape-awq serve --model NAME=CHECKPOINT` on a free loopback port, its memory sampled from spawn on."""

    def __init__(self, name: str, checkpoint: Path, serve_args: list[str], log: Path) -> None:
        self.name, self.log = name, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        command = [sys.executable, "-m", "lape_awq.quant.cli.main", "serve", "--port", str(self.port)]
        command += ["--model", f"{name}={checkpoint}", "--quiet", *serve_args]
        # The serve flag sets the KV cache; an inherited VLLM_CPU_KVCACHE_SPACE would override it.
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
        with log.open("w") as sink:  # own session: stop() signals the engine-core children too
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.memory = PeakMemorySampler(self.process.pid)

    def wait_ready(self, timeout: float) -> str | None:
        """None once /health says ready; else why not (the server's last log lines)."""
        deadline = time.monotonic() + timeout
        root = self.url.removesuffix("/v1")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"server exited with status {self.process.returncode}: {self.failure_reason()}"
            try:
                if httpx.get(f"{root}/health", timeout=5).status_code == 200:
                    self.memory.mark_ready()
                    return None
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return f"not ready after {timeout:.0f} s: {self.failure_reason()}"

    def failure_reason(self) -> str:
        """The last error of the log with its continuation lines (up to a blank one), else the last line."""
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines()]
        for index in range(len(lines) - 1, -1, -1):
            if "Error" in lines[index] or "error:" in lines[index]:
                message = []
                for line in lines[index:]:
                    if not line:
                        break
                    message.append(line)
                return " ".join(message)[:1000]
        nonblank = [line for line in lines if line]
        return nonblank[-1][-500:] if nonblank else "(no output)"

    def stop(self, timeout: float = 60.0) -> MemoryPeaks:
        """SIGTERM to the whole process group (SIGKILL after `timeout`); returns the memory peaks."""
        peaks = self.memory.stop()
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # whatever outlived the server (or ignored SIGTERM)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return peaks
