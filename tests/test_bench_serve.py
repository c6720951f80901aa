"""`lape-awq bench serve` end to end: real `lape-awq serve` processes (vLLM CPU engines) over a tiny Gemma 3
AWQ / AWQ-opt pair (a scripted model: every token is visible Korean text, so every token is timed), a
configuration whose server cannot start, and both peers: stock `vllm serve` on the AWQ-opt checkpoint
and a stand-in llama-server (tests/fake_llama_server.py), through the whole matrix. Then the pieces: a
paused server uses no CPU, and a peer that is not installed is reported with how to install it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from server_models import write_scripted_quantized_pair

from lape_awq.bench.peers import PeerMissing, ServerOptions, start_server
from lape_awq.bench.serve_matrix import ServeConfig, run_matrix
from lape_awq.quant.errors import UserError
from lape_awq.server.serve_process import ChildServer

MAX_TOKENS = 8
ANSWER = "안녕하세요 반갑습니다 오늘"


def fake_llama_server(tmp_path: Path) -> Path:
    """An executable that runs tests/fake_llama_server.py with this interpreter."""
    script = tmp_path / "llama-server"
    fake = Path(__file__).with_name("fake_llama_server.py")
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fake}" "$@"\n')
    script.chmod(0o755)
    return script


def test_matrix_runs_every_cell_twice_and_reports_memory_peers_and_the_skipped_config(
    tmp_path: Path, tokenizer
) -> None:
    checkpoints = write_scripted_quantized_pair(tmp_path, tokenizer, ANSWER)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
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
        "--peer",
        f"vllm={checkpoints['awq-opt']}",
        "--peer",
        f"llama.cpp={gguf}",
        "--llama-server",
        str(fake_llama_server(tmp_path)),
        "--threads",
        "3",
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
    assert "[16/16] round 2" in done.stdout  # progress, one line per cell

    stem = next(out.glob("serve_matrix_*_tiny.json")).with_suffix("")
    record = json.loads(stem.with_suffix(".json").read_text())
    configs = {c["name"]: c for c in record["configs"]}
    assert [c["status"] for c in record["configs"]] == ["ok", "ok", "skipped", "ok", "ok"]
    assert [c["server"] for c in record["configs"]][-2:] == ["vllm", "llama.cpp"]
    assert "no-such-architecture" in configs["broken"]["reason"]
    # stock vLLM ran the checkpoint with our engine options, as its own `vllm serve` process
    vllm_command = configs["vllm"]["command"]
    assert vllm_command[1:4] == ["-m", "vllm.entrypoints.launchers.api_server.entry", "--model"]
    assert "--max-num-seqs" in vllm_command and vllm_command[vllm_command.index("--max-num-seqs") + 1] == "2"
    # the llama.cpp peer: one slot per client, each with the model length, and the threads asked for
    argv = json.loads(gguf.with_name("model.gguf.argv.json").read_text())
    assert (argv["alias"], argv["parallel"], argv["ctx_size"]) == ("llama.cpp", "2", "1024")
    assert argv["threads"] == argv["threads_batch"] == "3"
    assert configs["llama.cpp"]["weight_bytes"] == 1004
    for name, checkpoint in (("awq", "awq"), ("awq-opt", "awq-opt"), ("vllm", "awq-opt")):
        files = list(checkpoints[checkpoint].glob("*.safetensors"))
        assert configs[name]["weight_bytes"] == sum(f.stat().st_size for f in files)
        memory = configs[name]["memory"]
        # a vLLM server (frontend + engine core) holds far more than 200 MiB; serving only adds to it
        assert 200 << 20 < memory["ready_rss"] <= memory["peak_rss"]
    assert configs["awq-opt"]["weight_bytes"] > configs["awq"]["weight_bytes"]  # the sparse FP16 part

    # every (config, clients) cell twice, the order reversed in the second round
    order = [(r["round"], r["concurrency"], r["config"]) for r in record["runs"]]
    live = ["awq", "awq-opt", "vllm", "llama.cpp"]
    assert order == [
        (round_, c, name) for round_, names in enumerate([live, live[::-1]]) for c in (1, 2) for name in names
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
    # our default against each peer, at every concurrency
    assert "| awq-opt / peer | clients |" in table
    assert all(f"| {peer} | {c} |" in table for peer in ("vllm", "llama.cpp") for c in (1, 2))
    assert "- llama.cpp (llama.cpp): `llama-server --model model.gguf --alias llama.cpp" in table
    png = stem.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_a_paused_server_uses_no_cpu_until_resumed(tmp_path: Path) -> None:
    spin = [sys.executable, "-c", "import time\nwhile True: time.sleep(0)"]
    server = ChildServer(spin, tmp_path / "spin.log", port=1)
    try:
        process = psutil.Process(server.process.pid)

        def cpu_over(seconds: float) -> float:
            before = sum(process.cpu_times()[:2])
            time.sleep(seconds)
            return sum(process.cpu_times()[:2]) - before

        assert cpu_over(0.5) > 0.05  # it spins, as an idle vLLM server does
        server.pause()
        time.sleep(0.1)
        assert cpu_over(0.5) == 0.0
        server.resume()
        assert cpu_over(0.5) > 0.05
        server.pause()
    finally:
        server.stop(timeout=5)  # a paused server is woken to take its SIGTERM
    assert server.process.returncode is not None


def test_a_missing_peer_is_reported_with_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LAPE_AWQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", "/nonexistent")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(PeerMissing, match="make install-peers"):
        start_server("llama.cpp", "llama.cpp", gguf, "auto", ServerOptions(), tmp_path / "log")
    with pytest.raises(PeerMissing, match="not an executable"):
        options = ServerOptions(llama_server=tmp_path / "nothing")
        start_server("llama.cpp", "llama.cpp", gguf, "auto", options, tmp_path / "log")
    # in the matrix: a skipped entry with the reason, and when nothing else serves, a clean error
    config = ServeConfig("llama.cpp", gguf, "auto", "llama.cpp")
    load = {"duration": 1.0, "warmup": 0, "max_tokens": 2, "seed": 0}
    with pytest.raises(UserError, match="no configuration could be served: llama-server not found"):
        run_matrix([config], [1], 1, load, ServerOptions(), 10.0, tmp_path)
