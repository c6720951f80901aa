"""The kernel benchmark: a clean skip without CUDA, and its whole path on tiny shapes in the interpreter."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch


def lape_awq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["lape-awq", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_skips_cleanly_without_cuda() -> None:
    done = lape_awq("bench", "kernels")
    assert done.returncode == 0, done.stderr
    assert "CUDA is not available" in done.stdout and "Skipped" in done.stdout


def test_refuses_unknown_model_and_bad_m() -> None:
    done = lape_awq("bench", "kernels", "--models", "llama-3.2-3b,gpt-5")
    assert done.returncode == 2 and "unknown model(s) ['gpt-5']" in done.stderr
    done = lape_awq("bench", "kernels", "--m", "1,two")
    assert done.returncode == 2 and "--m must be a comma list of integers" in done.stderr


def test_smoke_run_writes_every_variant(tmp_path: Path) -> None:
    done = lape_awq("bench", "kernels", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (result,) = tmp_path.glob("kernels_*_smoke.json")
    record = json.loads(result.read_text())
    variants = {(r["name"], r["m"], r["variant"]) for r in record["rows"]}
    for name in ("gate_up_proj", "down_proj"):
        for m in (1, 37):
            assert {v for n, mm, v in variants if (n, mm) == (name, m)} == {
                "cublas",
                "dequant_matmul",
                "ours_k0",
                "ours_k1pct",
            }
    assert all(r["seconds"] > 0 and r["gbps"] > 0 for r in record["rows"])
    assert record["copy_bandwidth_bytes_per_s"] > 0 and record["machine"]["torch"]
    assert list(record)[:3] == ["tool", "tool_version", "benchmark"] and record["benchmark"] == "kernels"
    assert "| smoke down_proj | 37 |" in result.with_suffix(".md").read_text()
