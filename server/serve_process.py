"""A `lape-awq serve` child process on a loopback port: started in its own session (so one signal reaches
its engine-core children too), waited for through /health, and stopped. `lape-awq demo` runs one; the
serving benchmark runs one per configuration (bench/server_process.py adds its memory sampling)."""

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


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`lape-awq serve --model NAME=CHECKPOINT ...` on 127.0.0.1 (`port` 0: a free one), output to `log`."""

    def __init__(
        self, models: list[tuple[str, Path]], serve_args: list[str], log: Path, port: int = 0
    ) -> None:
        self.log = log
        self.port = port or free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "lape_awq.quant.cli.main", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), *serve_args]
        for name, checkpoint in models:
            command += ["--model", f"{name}={checkpoint}"]
        # The serve flag sets the KV cache; an inherited VLLM_CPU_KVCACHE_SPACE would override it.
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float) -> str | None:
        """None once /health says every model is ready; else why not (the server's last log lines)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"server exited with status {self.process.returncode}: {self.failure_reason()}"
            try:
                if httpx.get(f"{self.root}/health", timeout=5).status_code == 200:
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

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the whole process group (uvicorn shuts its engines down), SIGKILL after `timeout`."""
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # whatever outlived the server (or ignored SIGTERM)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
