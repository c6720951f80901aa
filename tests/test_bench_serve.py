"""`lape-awq bench serve` end to end: real `lape-awq serve` processes (vLLM CPU engines) over a tiny Gemma 3
AWQ / AWQ-opt pair (a scripted model: every token is visible Korean text, so every token is timed), plus
a configuration whose server cannot start, through the whole matrix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server_models import write_scripted_quantized_pair

MAX_TOKENS = 8
ANSWER = "안녕하세요 반갑습니다 오늘"


def test_matrix_runs_every_cell_twice_and_reports_memory_and_the_skipped_config(
    tmp_path: Path, tokenizer
) -> None:
    checkpoints = write_scripted_quantized_pair(tmp_path, tokenizer, ANSWER)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "lape_awq.quant.cli.main",
        "bench",
        "serve",
        "--config",
        f"awq={checkpoints['awq']}",
        "--config",
        f"awq-opt={checkpoints['awq-opt']}",
        "--config",
        f"broken={broken}",
        "--concurrency",
        "1,2",
        "--repeats",
        "2",
        "--duration",
        "3",
        "--warmup",
        "1",
        "--max-tokens",
        str(MAX_TOKENS),
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--out",
        str(out),
        "--tag",
        "tiny",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[8/8] round 2" in done.stdout  # progress, one line per cell

    stem = next(out.glob("serve_matrix_*_tiny.json")).with_suffix("")
    record = json.loads(stem.with_suffix(".json").read_text())
    configs = {c["name"]: c for c in record["configs"]}
    assert [c["status"] for c in record["configs"]] == ["ok", "ok", "skipped"]
    assert "no-such-architecture" in configs["broken"]["reason"]
    for name in ("awq", "awq-opt"):
        files = list(checkpoints[name].glob("*.safetensors"))
        assert configs[name]["weight_bytes"] == sum(f.stat().st_size for f in files)
        memory = configs[name]["memory"]
        # a vLLM server (frontend + engine core) holds far more than 200 MiB; serving only adds to it
        assert 200 << 20 < memory["ready_rss"] <= memory["peak_rss"]
    assert configs["awq-opt"]["weight_bytes"] > configs["awq"]["weight_bytes"]  # the sparse FP16 part

    # every (config, clients) cell twice, the order reversed in the second round
    order = [(r["round"], r["concurrency"], r["config"]) for r in record["runs"]]
    assert order == [
        (0, 1, "awq"),
        (0, 1, "awq-opt"),
        (0, 2, "awq"),
        (0, 2, "awq-opt"),
        (1, 1, "awq-opt"),
        (1, 1, "awq"),
        (1, 2, "awq-opt"),
        (1, 2, "awq"),
    ]
    for run in record["runs"]:
        summary, samples = run["summary"], run["samples"]
        assert summary["failed"] == 0 and summary["completed"] == len(samples) > 0
        assert all(s["ok"] and s["output_tokens"] == MAX_TOKENS for s in samples)
        assert summary["output_throughput"] == MAX_TOKENS * len(samples) / summary["duration_s"]
        # every token arrives as its own chunk: one first token, then MAX_TOKENS - 1 gaps
        assert all(0 < s["ttft"] < s["latency"] and len(s["itl"]) == MAX_TOKENS - 1 for s in samples)
    assert record["settings"]["baseline"] == "awq"
    assert record["machine"]["vllm"]

    table = stem.with_suffix(".md").read_text()
    assert "| awq | 1 |" in table and "| awq-opt | 2 |" in table and "| broken |" not in table
    assert "- broken (`--quantization auto`) skipped:" in table
    assert "| awq-opt | auto |" in table
    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
