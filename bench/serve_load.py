"""Closed-loop streaming load against any OpenAI-compatible chat endpoint, with `vllm bench serve`'s metrics.

N clients each send one streaming chat request after another for a fixed time (after warm-up requests).
Per request: TTFT (send to first content), ITL (gaps between content chunks), TPOT ((latency - TTFT) /
(output tokens - 1)), end-to-end latency, output tokens from the server's usage report; failures are
counted, never dropped. Prompts are the packaged Korean questions (and a few English ones), in a fixed
seeded order.

    lape-awq bench load --url http://127.0.0.1:8000/v1 --model NAME [--concurrency 32] [--duration 60]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lape_awq.bench.run_info import git_commit, machine
from lape_awq.quant.errors import UserError

ENGLISH_PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "Write a short poem about autumn in Seoul.",
    "What are the pros and cons of remote work?",
    "Summarize the plot of a heist movie you would like to see.",
)


@dataclass
class RequestSample:
    """One request as the client saw it (seconds since its own start)."""

    ok: bool
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def load_prompts(seed: int) -> list[str]:
    """The packaged Korean judge questions plus a few English prompts, shuffled with `seed`."""
    from lape_awq.quant.judge_questions import load_questions

    prompts = [q.question for q in load_questions()[0]] + list(ENGLISH_PROMPTS)
    random.Random(seed).shuffle(prompts)
    return prompts


async def stream_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> RequestSample:
    """One streaming chat completion; timing starts right before the request is sent."""
    start = time.perf_counter()
    last: float | None = None
    sample = RequestSample(ok=False)
    try:
        async with client.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                sample.error = f"HTTP {response.status_code}: {text[:300]}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    sample.error = str(chunk["error"])[:300]
                    return sample
                now = time.perf_counter()
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    if last is None:
                        sample.ttft = now - start
                    else:
                        sample.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    sample.output_tokens = chunk["usage"]["completion_tokens"]
                    sample.prompt_tokens = chunk["usage"]["prompt_tokens"]
        sample.latency = time.perf_counter() - start
        sample.ok = sample.ttft is not None
        if not sample.ok:
            sample.error = "no content in the stream"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as error:
        sample.error = f"{type(error).__name__}: {error}"
    return sample


def percentiles(values: list[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 in milliseconds, numpy's linear percentiles as `vllm bench serve` reports."""
    if not values:
        return dict.fromkeys(("mean_ms", "median_ms", "p90_ms", "p99_ms"))
    ms = 1000 * np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean_ms": float(ms.mean()), "median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def summarize(samples: list[RequestSample], seconds: float) -> dict[str, Any]:
    """`vllm bench serve`'s summary over the measured window."""
    ok = [s for s in samples if s.ok]
    output = sum(s.output_tokens for s in ok)
    prompt = sum(s.prompt_tokens for s in ok)
    return {
        "duration_s": seconds,
        "completed": len(ok),
        "failed": len(samples) - len(ok),
        "request_throughput": len(ok) / seconds,
        "output_throughput": output / seconds,
        "total_token_throughput": (output + prompt) / seconds,
        "ttft": percentiles([s.ttft for s in ok if s.ttft is not None]),
        "tpot": percentiles([t for s in ok if (t := s.tpot) is not None]),
        "itl": percentiles([gap for s in ok for gap in s.itl]),
        "e2el": percentiles([s.latency for s in ok if s.latency is not None]),
    }


async def run_load(
    url: str, model: str, api_key: str | None, concurrency: int, duration: float, warmup: int,
    max_tokens: int, seed: int, ignore_eos: bool = True,
) -> tuple[list[RequestSample], float]:  # fmt: skip
    """`concurrency` clients, closed loop, for `duration` seconds after `warmup` requests."""
    prompts = load_prompts(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    counter = iter(range(10**9))

    def body() -> dict[str, Any]:
        prompt = prompts[next(counter) % len(prompts)]
        request = {
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        if ignore_eos:  # vLLM's extension: every request makes exactly max_tokens tokens
            request["ignore_eos"] = True
        return request

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(stream_one(client, url, body(), headers) for _ in range(warmup)))
        samples: list[RequestSample] = []
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                samples.append(await stream_one(client, url, body(), headers))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.perf_counter() - started


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the endpoint's /v1 base URL")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--api-key", default=os.environ.get("LAPE_AWQ_API_KEY"))
    parser.add_argument("--concurrency", type=int, default=32, help="clients, each one request at a time")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=int, default=4, help="requests sent (and not counted) first")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--no-ignore-eos", action="store_true", help="for servers without vLLM's ignore_eos")
    parser.add_argument("--seed", type=int, default=0, help="prompt order")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file name")


def run(args: argparse.Namespace) -> int:
    """Run the load; prints the summary and writes JSON (summary + every request) under --out."""
    if args.concurrency < 1 or args.duration <= 0 or args.max_tokens < 1:
        raise UserError("--concurrency, --duration and --max-tokens must be positive")
    print(f"{args.concurrency} streaming clients on {args.model} at {args.url} for {args.duration:.0f} s ...")
    samples, seconds = asyncio.run(
        run_load(args.url, args.model, args.api_key, args.concurrency, args.duration, args.warmup,
                 args.max_tokens, args.seed, ignore_eos=not args.no_ignore_eos)
    )  # fmt: skip
    summary = summarize(samples, seconds)
    record = {
        "benchmark": "serve_load",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "out", "run")},
        "summary": summary,
        "errors": sorted({s.error for s in samples if s.error})[:20],
        "samples": [asdict(s) for s in samples],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"serve_load_{record['date'][:10]}_c{args.concurrency}{('_' + args.tag) if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out / name}")
    return 0 if summary["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
