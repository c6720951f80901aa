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
import torch
from fake_llama_server import VOCAB, fake_logits
from server_models import write_scripted_quantized_pair

from lape_awq.bench.peers import PeerMissing, ServerOptions, start_server
from lape_awq.bench.serve_matrix import ServeConfig, run_matrix
from lape_awq.quant.errors import UserError
from lape_awq.server.engines import cpu_engine_env
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
    streamed = []  # per run, the most chunks one request arrived in
    for run in record["runs"]:
        summary, samples = run["summary"], run["samples"]
        assert summary["failed"] == 0 and summary["completed"] == len(samples) > 0
        assert all(s["ok"] and s["output_tokens"] == MAX_TOKENS for s in samples)
        assert summary["output_throughput"] == MAX_TOKENS * len(samples) / summary["duration_s"]
        # one gap per chunk after the first; vLLM merges a request's deltas into one chunk when its reader
        # falls behind (RequestOutputCollector), as a loaded 2-core CI machine makes it, so a sample may
        # have fewer than MAX_TOKENS - 1 gaps, never more, and they fit between its first token and its end
        assert all(0 < s["ttft"] < s["latency"] and 1 <= len(s["itl"]) <= MAX_TOKENS - 1 for s in samples)
        assert all(sum(s["itl"]) <= s["latency"] - s["ttft"] + 1e-6 for s in samples)
        streamed.append(max(len(s["itl"]) for s in samples))
    # and the servers stream: in every run at least one request arrived one token per chunk
    assert min(streamed) == MAX_TOKENS - 1
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
    # ours and the stock vLLM peer ran one engine environment, and the table says which
    engine_env = cpu_engine_env(1)
    assert record["settings"]["engine_env"] == engine_env
    if engine_env:
        assert "- vLLM engines (ours and stock vLLM): `VLLM_CPU_NUM_OF_RESERVED_CPU=0`" in table
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


class ShiftedModel(torch.nn.Module):
    """The stand-in llama-server's model with one token's logit raised: our side of the comparison."""

    SHIFTED_TOKEN, SHIFT = 5, 2.5

    def forward(self, input_ids: torch.Tensor):
        logits = torch.tensor(fake_logits(input_ids[0].tolist()), dtype=torch.float64)
        logits[self.SHIFTED_TOKEN] += self.SHIFT
        return type("Output", (), {"logits": logits.view(1, 1, -1).expand(1, input_ids.shape[1], -1)})


def test_gguf_agreement_compares_llama_cpp_top_tokens_with_our_log_softmax(tmp_path: Path) -> None:
    from lape_awq.bench.gguf_agreement import TOP, compare

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    options = ServerOptions(llama_server=fake_llama_server(tmp_path), max_num_seqs=1)
    server = start_server("llama.cpp", "gguf", gguf, "auto", options, tmp_path / "llama.log")
    prompts = [[2, *range(start, start + 9)] for start in range(12)]
    try:
        assert server.wait_ready(60) is None
        result = compare(ShiftedModel(), server.root, prompts)
    finally:
        server.stop()
    # the reference, in float64 from the same logits: llama.cpp's top tokens, our log-softmax at them
    gaps, top1, mass_llama, mass_ours = [], [], [], []
    for prompt in prompts:
        theirs = torch.log_softmax(torch.tensor(fake_logits(prompt), dtype=torch.float64), -1)
        ours = torch.log_softmax(ShiftedModel()(torch.tensor([prompt])).logits[0, -1], -1)
        top = theirs.argsort(descending=True)[:TOP]
        gaps.append((theirs[top] - ours[top]).abs())
        top1.append(bool(ours.argmax() == top[0]))
        mass_llama.append(float(theirs[top].exp().sum()))
        mass_ours.append(float(ours[top].exp().sum()))
    every = torch.cat(gaps)
    assert 0 < sum(top1) < len(prompts)  # the raised token wins some positions: both cases are counted
    assert result["positions"] == len(prompts)
    assert result["top1_agreement"] == pytest.approx(sum(top1) / len(prompts))
    assert result["mean_abs_logprob_gap"] == pytest.approx(float(every.mean()), rel=1e-9)
    assert result["max_abs_logprob_gap"] == pytest.approx(float(every.max()), rel=1e-9)
    assert result["top1_abs_logprob_gap_mean"] == pytest.approx(
        float(torch.stack([g[0] for g in gaps]).mean())
    )
    assert result["top_mass_llama_cpp"] == pytest.approx(sum(mass_llama) / len(prompts), rel=1e-9)
    assert result["top_mass_ours"] == pytest.approx(sum(mass_ours) / len(prompts), rel=1e-9)
    assert VOCAB > TOP


@pytest.mark.slow
def test_real_llama_cpp_serves_the_default_gguf_through_the_matrix(tmp_path: Path) -> None:
    """When llama.cpp is installed (make install-peers): its llama-server on the default GGUF, one short
    matrix cell, answers counted by the same client as ours."""
    from lape_awq.bench.peers import llama_cpp_tool
    from lape_awq.quant.default_model import default_gguf

    try:
        llama_cpp_tool("llama-server")
    except PeerMissing as missing:
        pytest.skip(str(missing))
    config = ServeConfig("llama.cpp", default_gguf(), "auto", "llama.cpp")
    load = {"duration": 5.0, "warmup": 1, "max_tokens": 16, "seed": 0}
    result = run_matrix([config], [1, 2], 1, load, ServerOptions(max_num_seqs=2), 300.0, tmp_path)
    assert [c["status"] for c in result["configs"]] == ["ok"]
    for run in result["runs"]:
        assert run["summary"]["failed"] == 0 and run["summary"]["completed"] > 0
        assert all(sample["output_tokens"] > 0 for sample in run["samples"])
