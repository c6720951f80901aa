"""The load generator's metrics: exact arithmetic on fixed samples, and timings measured against a fake
OpenAI streaming server with known delays (a first token after 200 ms, then one every 50 ms)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lape_awq.bench.serve_load import (
    RequestSample,
    arrival_offsets,
    percentiles,
    random_prompts,
    run_load,
    stream_one,
    summarize,
)
from lape_awq.quant.text_sources import builtin_text

FIRST_DELAY, GAP, TOKENS, PROMPT_TOKENS = 0.2, 0.05, 5, 7


def fake_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body["model"] == "broken":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        async def events():
            yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
            await asyncio.sleep(FIRST_DELAY)
            for i in range(TOKENS):
                if i:
                    await asyncio.sleep(GAP)
                if body["model"] == "fails-midway" and i == 2:
                    yield 'data: {"error": {"message": "engine died"}}\n\n'
                    return
                yield (
                    "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}) + "\n\n"
                )
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": TOKENS}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def test_summary_arithmetic_is_exact() -> None:
    samples = [
        RequestSample(
            ok=True, ttft=0.1, latency=0.5, output_tokens=5, prompt_tokens=10, itl=[0.1, 0.1, 0.1, 0.1]
        ),
        RequestSample(ok=True, ttft=0.3, latency=1.1, output_tokens=9, prompt_tokens=20, itl=[0.1] * 8),
        RequestSample(ok=False, error="HTTP 503"),
    ]
    summary = summarize(samples, seconds=2.0)
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["request_throughput"] == 1.0
    assert summary["output_throughput"] == 7.0  # 14 tokens / 2 s
    assert summary["total_token_throughput"] == 22.0  # (14 + 30) / 2 s
    assert summary["ttft"]["mean_ms"] == pytest.approx(200.0)
    assert summary["ttft"]["median_ms"] == pytest.approx(200.0)
    assert summary["tpot"]["mean_ms"] == pytest.approx(100.0)  # (0.4 / 4 + 0.8 / 8) / 2
    assert summary["e2el"]["p99_ms"] == pytest.approx(float(np.percentile([500, 1100], 99)))
    assert percentiles([]) == {"mean_ms": None, "median_ms": None, "p90_ms": None, "p99_ms": None}


def test_one_stream_is_timed_like_vllm_bench_serve(fake_server: str) -> None:
    async def once(model: str) -> RequestSample:
        async with httpx.AsyncClient(timeout=30) as client:
            return await stream_one(client, fake_server, {"model": model}, {})

    sample = asyncio.run(once("ok"))
    assert sample.ok and sample.output_tokens == TOKENS and sample.prompt_tokens == PROMPT_TOKENS
    assert FIRST_DELAY <= sample.ttft < FIRST_DELAY + 0.15  # the empty role chunk does not count
    assert len(sample.itl) == TOKENS - 1
    assert all(GAP * 0.8 <= gap < GAP + 0.1 for gap in sample.itl)
    assert sample.tpot == pytest.approx((sample.latency - sample.ttft) / (TOKENS - 1))
    assert GAP * 0.8 <= sample.tpot < GAP + 0.1

    broken, midway = asyncio.run(once("broken")), asyncio.run(once("fails-midway"))
    assert not broken.ok and broken.error.startswith("HTTP 500")
    assert not midway.ok and "engine died" in midway.error


def test_closed_loop_counts_every_request(fake_server: str) -> None:
    samples, seconds = asyncio.run(
        run_load(fake_server, "ok", None, concurrency=4, duration=1.0, warmup=2, max_tokens=5, seed=0)
    )
    # each request takes ~0.4 s: 4 clients in a 1 s window finish 2-3 requests each
    assert 8 <= len(samples) <= 12 and all(s.ok for s in samples)
    assert seconds >= 1.0
    failing, _ = asyncio.run(
        run_load(fake_server, "broken", None, concurrency=2, duration=0.3, warmup=0, max_tokens=5, seed=0)
    )
    assert failing and summarize(failing, 0.3)["failed"] == len(failing)


def test_a_request_count_ends_the_window(fake_server: str) -> None:
    samples, _ = asyncio.run(
        run_load(
            fake_server,
            "ok",
            None,
            concurrency=3,
            duration=None,
            warmup=0,
            max_tokens=5,
            seed=0,
            num_requests=7,
        )
    )
    assert len(samples) == 7 and all(s.ok for s in samples)


def test_poisson_arrivals_follow_the_seeded_schedule_and_the_concurrency_cap(fake_server: str) -> None:
    rate, count = 20.0, 8
    schedule = arrival_offsets(rate, seed=3, count=count)
    assert np.all(np.diff(schedule) > 0) and schedule[0] > 0
    samples, _ = asyncio.run(
        run_load(
            fake_server,
            "ok",
            None,
            concurrency=count,
            duration=None,
            warmup=0,
            max_tokens=5,
            seed=3,
            num_requests=count,
            request_rate=rate,
        )
    )
    sent = sorted(s.sent for s in samples)
    assert len(sent) == count and all(s.ok for s in samples)
    # with free slots every request leaves at its scheduled time (event-loop jitter aside)
    assert all(at <= t < at + 0.08 for at, t in zip(schedule, sent, strict=True))
    # one slot: each request waits for the previous one (~0.4 s each), whatever the schedule says
    capped, _ = asyncio.run(
        run_load(
            fake_server,
            "ok",
            None,
            concurrency=1,
            duration=None,
            warmup=0,
            max_tokens=5,
            seed=3,
            num_requests=4,
            request_rate=1000.0,
        )
    )
    gaps = np.diff(sorted(s.sent for s in capped))
    assert len(capped) == 4 and np.all(gaps >= FIRST_DELAY + (TOKENS - 1) * GAP * 0.9)


def test_random_prompts_are_seeded_windows_of_held_out_text() -> None:
    prompts = random_prompts(seed=1, count=50, words=40, range_ratio=0.25, lang="ko")
    assert prompts == random_prompts(seed=1, count=50, words=40, range_ratio=0.25, lang="ko")
    assert prompts != random_prompts(seed=2, count=50, words=40, range_ratio=0.25, lang="ko")
    lengths = [len(p.split()) for p in prompts]
    assert min(lengths) >= 30 and max(lengths) <= 50 and len(set(lengths)) > 5
    held_out = builtin_text("ko", "heldout").text.split()
    joined = " ".join(held_out)
    assert all(p in joined for p in prompts)
    assert any("\uac00" <= ch <= "\ud7a3" for ch in prompts[0])  # Hangul


def test_the_load_command_writes_a_stamped_result_file(fake_server: str, tmp_path, capsys) -> None:
    from lape_awq.quant.cli.main import main

    argv = ["bench", "load", "--url", fake_server, "--model", "ok", "--num-requests", "3", "--warmup", "0"]
    assert main([*argv, "--max-tokens", "5", "--concurrency", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("serve_load_*_c2.json")
    record = json.loads(path.read_text())
    assert list(record)[:3] == ["tool", "tool_version", "benchmark"] and record["tool"] == "lape-awq"
    assert record["benchmark"] == "serve_load" and record["machine"]["torch"]
    assert record["summary"]["completed"] == 3 and len(record["samples"]) == 3
    assert record["settings"]["request_rate"] is None  # closed loop; strict JSON has no Infinity
    assert not list(tmp_path.glob(".*"))  # no temp file left beside it
