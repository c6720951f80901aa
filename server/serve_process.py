"""An HTTP server child process on a loopback port: started in its own session (so one signal reaches its
engine-core children too), waited for through its health route, paused, resumed and stopped. `lape-awq
demo` runs a `lape-awq serve` (ServeProcess); the serving benchmark runs one per configuration, ours or a
peer's (bench/peers.py), and samples its memory (bench/server_process.py)."""

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


class ChildServer:
    """`command` (which must listen on 127.0.0.1:`port`) as a child process in its own session, output to
    `log`; ready once GET `health` answers 200."""

    def __init__(
        self, command: list[str], log: Path, port: int, health: str = "/health", env: dict | None = None
    ) -> None:
        self.log = log
        self.port = port
        self.root = f"http://127.0.0.1:{port}"
        self.health = health
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_ready(self, timeout: float) -> str | None:
        """None once the health route answers 200; else why not (the server's last log lines)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"server exited with status {self.process.returncode}: {self.failure_reason()}"
            try:
                if httpx.get(f"{self.root}{self.health}", timeout=5).status_code == 200:
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

    def pause(self) -> None:
        """SIGSTOP to the whole process group. An idle vLLM server can keep polling (its engine core and
        worker spin), so a benchmark stops the servers it is not measuring; a paused server uses no CPU."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the whole process group (uvicorn shuts its engines down), SIGKILL after `timeout`."""
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.process.pid, signal.SIGTERM)
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused server must run to see its SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # whatever outlived the server (or ignored SIGTERM)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def vllm_child_env() -> dict[str, str]:
    """This process's environment for a vLLM server child whose KV cache is set by a flag: without an
    inherited VLLM_CPU_KVCACHE_SPACE, which would override the flag."""
    return {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}


class ServeProcess(ChildServer):
    """`lape-awq serve --model NAME=CHECKPOINT ...` on 127.0.0.1 (`port` 0: a free one), output to `log`."""

    def __init__(
        self, models: list[tuple[str, Path]], serve_args: list[str], log: Path, port: int = 0
    ) -> None:
        port = port or free_port()
        command = [sys.executable, "-m", "lape_awq.quant.cli.main", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(port), *serve_args]
        for name, checkpoint in models:
            command += ["--model", f"{name}={checkpoint}"]
        super().__init__(command, log, port, "/health", vllm_child_env())
