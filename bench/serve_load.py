"""Streaming load against any OpenAI-compatible chat endpoint, with `vllm bench serve`'s metrics.

Arrivals: closed loop (default: N clients, each sending its next request when the last one ends) or
Poisson at `--request-rate` requests/s with at most `--concurrency` in flight (a request waits for a free
slot, as `vllm bench serve --max-concurrency` does). The measured window is `--duration` seconds or
`--num-requests` requests, after `--warmup` requests. Per request: TTFT (send to first visible text), ITL
(gaps between content chunks), TPOT ((latency - TTFT) / (output tokens - 1)), end-to-end latency, output
tokens from the server's usage report; failures are counted, never dropped. Prompts: the packaged Korean
questions and a few English ones in a seeded order (`--prompts chat`), or random-length windows of the
held-out corpus text of `--prompt-lang` (`--prompts random`, `--random-words` +- `--random-range-ratio`).

    lape-awq bench load --url http://127.0.0.1:8000/v1 --model NAME [--concurrency 32] [--duration 60]
    lape-awq bench load --model NAME --request-rate 4 --num-requests 200 --prompts random
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lape_awq.bench.run_info import result_header, write_json
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
    sent: float | None = None  # seconds from the start of the measured window to the request's send

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def load_prompts(seed: int) -> list[str]:
    """The packaged Korean judge questions plus a few English prompts, shuffled with `seed`."""
    from lape_awq.quant.evaluation.judge.questions import load_questions

    prompts = [q.question for q in load_questions()[0]] + list(ENGLISH_PROMPTS)
    random.Random(seed).shuffle(prompts)
    return prompts


def random_prompts(seed: int, count: int, words: int, range_ratio: float, lang: str = "ko") -> list[str]:
    """`count` windows of the held-out corpus text of `lang` (never used for LAPE or calibration), each of
    a length drawn uniformly from words * [1 - range_ratio, 1 + range_ratio] words."""
    from lape_awq.quant.text_sources import builtin_text

    corpus = builtin_text(lang, "heldout").text.split()
    low, high = max(1, round(words * (1 - range_ratio))), max(1, round(words * (1 + range_ratio)))
    if high >= len(corpus):
        raise UserError(
            f"--random-words {words} is longer than the {lang} held-out text ({len(corpus)} words)"
        )
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.randint(low, high)
        start = rng.randrange(len(corpus) - length)
        prompts.append(" ".join(corpus[start : start + length]))
    return prompts


def arrival_offsets(rate: float, seed: int, count: int) -> np.ndarray:
    """The first `count` arrival times (seconds) of a Poisson process of `rate` per second."""
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=count))


async def stream_one(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str], origin: float = 0.0
) -> RequestSample:
    """One streaming chat completion; timing starts right before the request is sent (`sent` is counted
    from `origin`, a perf_counter time)."""
    start = time.perf_counter()
    last: float | None = None
    sample = RequestSample(ok=False, sent=start - origin)
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
    url: str,
    model: str,
    api_key: str | None,
    concurrency: int,
    duration: float | None,
    warmup: int,
    max_tokens: int,
    seed: int,
    ignore_eos: bool = True,
    num_requests: int | None = None,
    request_rate: float = math.inf,
    prompts: list[str] | None = None,
) -> tuple[list[RequestSample], float]:
    """After `warmup` requests: for `duration` seconds and/or `num_requests` requests, either `concurrency`
    clients in a closed loop (`request_rate` inf) or Poisson arrivals at `request_rate` with at most
    `concurrency` in flight. Returns every measured request and the window's length in seconds."""
    if duration is None and num_requests is None:
        raise ValueError("give a duration, a request count or both")
    prompts = prompts or load_prompts(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    counter = iter(range(10**9))

    def body() -> dict[str, Any]:
        prompt = prompts[next(counter) % len(prompts)]
        request = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if ignore_eos:  # vLLM's extension: every request makes exactly max_tokens tokens
            request["ignore_eos"] = True
        return request

    # A fresh connection per request, for every server alike: llama-server closes kept-alive connections
    # on its own schedule, and a request sent on one it just closed failed as "Server disconnected without
    # sending a response" (8 of 42 single-client requests, serve_matrix_2026-12-07). On loopback a connect
    # costs well under a millisecond.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await asyncio.gather(*(stream_one(client, url, body(), headers) for _ in range(warmup)))
        samples: list[RequestSample] = []
        started = time.perf_counter()
        deadline = started + (math.inf if duration is None else duration)
        budget = iter(range(num_requests if num_requests is not None else 10**12))

        if math.isinf(request_rate):

            async def worker() -> None:
                while time.perf_counter() < deadline and next(budget, None) is not None:
                    samples.append(await stream_one(client, url, body(), headers, started))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            slots = asyncio.Semaphore(concurrency)

            async def send() -> None:
                async with slots:
                    samples.append(await stream_one(client, url, body(), headers, started))

            tasks = []
            # enough arrivals for the window: a Poisson count exceeds twice its mean + 1000 with odds ~0
            planned = num_requests if num_requests is not None else int(2 * request_rate * duration) + 1000
            offsets = iter(arrival_offsets(request_rate, seed, planned))
            while next(budget, None) is not None:
                at = started + next(offsets)
                if at >= deadline:
                    break
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.create_task(send()))
            await asyncio.gather(*tasks)
        return samples, time.perf_counter() - started


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the endpoint's /v1 base URL")
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--api-key", default=os.environ.get("LAPE_AWQ_API_KEY"))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="closed loop: clients; with --request-rate: most in flight",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals per second; inf: closed loop",
    )
    parser.add_argument(
        "--duration", type=float, help="seconds of measured load (default 60 without --num-requests)"
    )
    parser.add_argument(
        "--num-requests", type=int, help="measured requests (ends the window with --duration)"
    )
    parser.add_argument(
        "--prompts", choices=("chat", "random"), default="chat", help="chat questions or random text"
    )
    parser.add_argument("--prompt-lang", default="ko", help="--prompts random: corpus language")
    parser.add_argument("--random-words", type=int, default=200, help="--prompts random: mean prompt length")
    parser.add_argument(
        "--random-range-ratio", type=float, default=0.5, help="--prompts random: length spread"
    )
    parser.add_argument("--warmup", type=int, default=4, help="requests sent (and not counted) first")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--no-ignore-eos", action="store_true", help="for servers without vLLM's ignore_eos")
    parser.add_argument("--seed", type=int, default=0, help="prompt order")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")
    parser.add_argument("--tag", default="", help="suffix of the result file name")


def run(args: argparse.Namespace) -> int:
    """Run the load; prints the summary and writes JSON (summary + every request) under --out."""
    if args.duration is None and args.num_requests is None:
        args.duration = 60.0
    positive = (
        args.concurrency,
        args.max_tokens,
        args.request_rate,
        1 if args.duration is None else args.duration,
        1 if args.num_requests is None else args.num_requests,
    )
    if min(positive) <= 0 or args.random_words < 1 or not 0 <= args.random_range_ratio < 1:
        raise UserError(
            "--concurrency, --max-tokens, --request-rate, --duration, --num-requests and --random-words must "
            "be positive, --random-range-ratio in [0, 1)"
        )
    prompts = None
    if args.prompts == "random":
        prompts = random_prompts(args.seed, 256, args.random_words, args.random_range_ratio, args.prompt_lang)
    closed_loop = math.isinf(args.request_rate)
    arrivals = (
        f"{args.concurrency} closed-loop clients"
        if closed_loop
        else f"Poisson {args.request_rate:g} req/s, at most {args.concurrency} in flight"
    )
    window = [f"{args.duration:g} s"] if args.duration else []
    window += [f"{args.num_requests} requests"] if args.num_requests else []
    print(f"{arrivals} on {args.model} at {args.url} for {' or '.join(window)} ...")
    samples, seconds = asyncio.run(
        run_load(
            args.url,
            args.model,
            args.api_key,
            args.concurrency,
            args.duration,
            args.warmup,
            args.max_tokens,
            args.seed,
            ignore_eos=not args.no_ignore_eos,
            num_requests=args.num_requests,
            request_rate=args.request_rate,
            prompts=prompts,
        )
    )
    summary = summarize(samples, seconds)
    record = {
        **result_header("serve_load"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "out", "run")}
        | {"request_rate": None if closed_loop else args.request_rate},  # strict JSON has no Infinity
        "summary": summary,
        "errors": sorted({s.error for s in samples if s.error})[:20],
        "samples": [asdict(s) for s in samples],
    }
    suffix = ("" if closed_loop else f"_r{args.request_rate:g}") + (f"_{args.tag}" if args.tag else "")
    path = write_json(
        args.out / f"serve_load_{record['date'][:10]}_c{args.concurrency}{suffix}.json", record, 1
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
