"""Soak: streaming clients against one `lape-awq serve` for a long time, with a hot swap every few minutes
and malformed requests and mid-stream disconnects mixed in.

Reports failed requests (target 0), latency percentiles per time window, the server's resident memory
(its whole process tree) over time with its trend after warm-up (target: flat, under 1% growth per 10
minutes), and what is still held once the load stops (leases and requests inside the engines: target 0).
The served name alternates between two checkpoints (default: the default model's AWQ-opt and AWQ).

    lape-awq bench soak                                    # 16 clients, 30 minutes, a swap every 5
    lape-awq bench soak --clients 8 --duration 600 --swap-every 120
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from lape_awq.bench.formatting import MiB
from lape_awq.bench.process_memory import total_rss
from lape_awq.bench.run_info import result_header, write_json
from lape_awq.bench.serve_load import RequestSample, load_prompts, percentiles, stream_one
from lape_awq.bench.serve_plots import save_figure
from lape_awq.quant.errors import UserError

NAME = "chat"
# Client mistakes sent during the soak; each must get a 4xx and leave the server serving.
MALFORMED = (
    ("not JSON", b'{"model": "chat", "messages": ['),
    (
        "wrong type",
        b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    ),
    ("unknown model", b'{"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}'),
    ("lone surrogate", b'{"model": "chat", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    (
        "negative max_tokens",
        b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
    ),
)


SWAP_SETTLE_S = 30.0  # after a swap returns, the old engine drains and stops: its memory goes with it


def steady_samples(
    series: list[tuple[float, int]], swaps: list[dict[str, Any]], warmup: float
) -> list[tuple[float, int]]:
    """The RSS samples taken after `warmup` seconds and outside every swap (from its start until
    SWAP_SETTLE_S after it returned), when two engines can be alive at once."""
    busy = [(swap["at_s"], swap["at_s"] + swap["seconds"] + SWAP_SETTLE_S) for swap in swaps]
    return [(t, rss) for t, rss in series if t >= warmup and not any(a <= t <= b for a, b in busy)]


def rss_trend(samples: list[tuple[float, int]]) -> dict[str, float | None]:
    """Least-squares line through RSS samples (seconds, bytes): its slope in MiB per 10 minutes and as a
    percentage of the mean level."""
    points = np.array(samples, dtype=np.float64)
    if len(points) < 3:
        return {"mib_per_10min": None, "percent_per_10min": None, "mean_mib": None}
    slope = np.polyfit(points[:, 0], points[:, 1], 1)[0]  # bytes per second
    mean = points[:, 1].mean()
    return {
        "mib_per_10min": float(slope * 600 / MiB),
        "percent_per_10min": float(100 * slope * 600 / mean),
        "mean_mib": float(mean / MiB),
    }


def windows(samples: list[RequestSample], length: float, duration: float) -> list[dict[str, Any]]:
    """Per `length`-second window of send times: requests completed and failed, output tokens/s, TTFT and
    end-to-end latency percentiles."""
    rows = []
    for start in np.arange(0.0, duration, length):
        inside = [s for s in samples if s.sent is not None and start <= s.sent < start + length]
        ok = [s for s in inside if s.ok]
        rows.append(
            {
                "start_s": float(start),
                "completed": len(ok),
                "failed": len(inside) - len(ok),
                "output_throughput": sum(s.output_tokens for s in ok) / length,
                "ttft": percentiles([s.ttft for s in ok if s.ttft is not None]),
                "e2el": percentiles([s.latency for s in ok if s.latency is not None]),
            }
        )
    return rows


class RssSampler:
    """The server process tree's resident memory every `interval` seconds, in a thread."""

    def __init__(self, pid: int, origin: float, interval: float = 5.0) -> None:
        self.series: list[tuple[float, int]] = []
        self._root, self._origin, self._interval = psutil.Process(pid), origin, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                tree = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            self.series.append((time.perf_counter() - self._origin, total_rss(tree)))
            self._stopped.wait(self._interval)

    def stop(self) -> list[tuple[float, int]]:
        self._stopped.set()
        self._thread.join()
        return self.series


def metric_total(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples over all its labels."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


async def soak(args: argparse.Namespace, root: str, keys: dict[str, str], checkpoints: list[Path]) -> dict:
    """The load, the swaps and the mistakes for `args.duration` seconds; then what is left held."""
    url, user, admin = f"{root}/v1", keys["user"], keys["admin"]
    prompts = load_prompts(args.seed)
    counter = iter(range(10**12))

    def body() -> dict[str, Any]:
        return {
            "model": NAME,
            "messages": [{"role": "user", "content": prompts[next(counter) % len(prompts)]}],
            "max_tokens": args.max_tokens,
            "temperature": 0.7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }

    samples: list[RequestSample] = []
    swaps: list[dict[str, Any]] = []
    mistakes: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        origin = time.perf_counter()
        deadline = origin + args.duration
        headers = {"Authorization": f"Bearer {user}"}

        async def worker() -> None:
            while time.perf_counter() < deadline:
                samples.append(await stream_one(client, url, body(), headers, origin))

        async def swapper() -> None:
            current = 0
            while time.perf_counter() + args.swap_every < deadline:
                await asyncio.sleep(args.swap_every)
                if time.perf_counter() >= deadline:  # the previous swap ran long
                    break
                current = 1 - current
                started = time.perf_counter()
                response = await client.post(
                    f"{root}/admin/models/{NAME}/swap",
                    json={"checkpoint": str(checkpoints[current])},
                    headers={"Authorization": f"Bearer {admin}"},
                )
                swaps.append(
                    {
                        "at_s": started - origin,
                        "to": checkpoints[current].name,
                        "status": response.status_code,
                        "seconds": time.perf_counter() - started,
                        "error": None if response.status_code == 200 else response.text[:300],
                    }
                )
                to = checkpoints[current].name
                print(f"  {started - origin:7.0f} s  swap to {to}: {response.status_code}")

        async def mischief() -> None:
            turn = 0
            while time.perf_counter() + args.chaos_every < deadline:
                await asyncio.sleep(args.chaos_every)
                at = time.perf_counter() - origin
                if turn % 2 == 0:
                    what, payload = MALFORMED[(turn // 2) % len(MALFORMED)]
                    response = await client.post(
                        f"{url}/chat/completions",
                        content=payload,
                        headers=headers | {"Content-Type": "application/json"},
                    )
                    ok = 400 <= response.status_code < 500 and "error" in response.json()
                    mistakes.append({"at_s": at, "kind": what, "status": response.status_code, "ok": ok})
                else:  # a client that leaves after its first words
                    status = 0
                    async with client.stream(
                        "POST", f"{url}/chat/completions", json=body(), headers=headers
                    ) as r:
                        status = r.status_code
                        async for line in r.aiter_lines():
                            if '"content"' in line:
                                break
                    mistakes.append({"at_s": at, "kind": "disconnect", "status": status, "ok": status == 200})
                turn += 1

        await asyncio.gather(*(worker() for _ in range(args.clients)), swapper(), mischief())
        elapsed = time.perf_counter() - origin
        # The load has stopped: every lease must come back and every engine request finish or be aborted.
        await asyncio.sleep(args.settle)
        ops = {"Authorization": f"Bearer {admin}"}
        metrics = (await client.get(f"{root}/metrics", headers=ops)).text
        listing = (await client.get(f"{root}/admin/models", headers=ops)).json()
        health = (await client.get(f"{root}/health")).status_code
    end = {
        "leases_held": metric_total(metrics, "lape_awq_in_flight_requests"),
        "engine_requests": metric_total(metrics, "lape_awq_engine_unfinished_requests"),
        "engines_draining": len(listing["draining"]),
        "health": health,
        "stalled_clients": metric_total(metrics, "lape_awq_stalled_clients_total"),
        "cancelled_requests": metric_total(metrics, "lape_awq_cancelled_requests_total"),
        "engine_deaths": metric_total(metrics, "lape_awq_engine_deaths_total"),
    }
    return {"samples": samples, "swaps": swaps, "mistakes": mistakes, "elapsed": elapsed, "end": end}


def plot_soak(record: dict[str, Any], path: Path) -> None:
    """Two panels over time: TTFT and end-to-end latency (p50, p99 per window) with the swaps marked; the
    server's RSS with the trend line after warm-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_rss) = plt.subplots(1, 2, figsize=(14, 4.6))
    minutes = [w["start_s"] / 60 for w in record["windows"]]
    for key, color in (("ttft", "C0"), ("e2el", "C1")):
        label = "TTFT" if key == "ttft" else "E2E"
        for stat, style in (("median_ms", "-"), ("p99_ms", "--")):
            values = [(w[key][stat] or np.nan) / 1000 for w in record["windows"]]
            ax_lat.plot(minutes, values, style, color=color, label=f"{label} {stat.split('_')[0]}")
    for swap in record["swaps"]:
        ax_lat.axvline(swap["at_s"] / 60, color="grey", lw=0.8, ls=":")
    ax_lat.set(xlabel="minutes", ylabel="seconds", title="Latency per window (dotted: hot swaps)")
    ax_lat.legend(fontsize=8)
    series = np.array(record["rss"]["series"], dtype=np.float64)
    ax_rss.plot(series[:, 0] / 60, series[:, 1] / MiB, color="C2", lw=0.8, label="RSS (process tree)")
    trend = record["rss"]["trend"]
    if trend["mib_per_10min"] is not None:
        after = np.array(record["rss"]["steady"], dtype=np.float64)
        fit = np.polyfit(after[:, 0], after[:, 1] / MiB, 1)
        ax_rss.plot(
            after[:, 0] / 60,
            np.polyval(fit, after[:, 0]),
            "k--",
            label=f"trend {trend['mib_per_10min']:+.1f} MiB / 10 min ({trend['percent_per_10min']:+.2f}%)",
        )
    ax_rss.set(xlabel="minutes", ylabel="MiB", title="Server memory (trend: after warm-up, outside swaps)")
    ax_rss.legend(fontsize=8)
    save_figure(fig, record, f"lape-awq soak, {record['settings']['clients']} clients", path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        dest="checkpoints",
        action="append",
        type=Path,
        help="the two checkpoints the served name alternates between (give twice; default: the default "
        "model's AWQ-opt and AWQ, built if missing)",
    )
    parser.add_argument("--clients", type=int, default=16, help="closed-loop streaming clients")
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--swap-every", type=float, default=300.0, help="seconds between hot swaps")
    parser.add_argument(
        "--chaos-every", type=float, default=15.0, help="seconds between a malformed request or a disconnect"
    )
    parser.add_argument("--window", type=float, default=60.0, help="seconds per latency window")
    parser.add_argument("--rss-warmup", type=float, default=300.0, help="seconds left out of the RSS trend")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds after the load before the end check"
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="the server's CPU KV cache")
    parser.add_argument("--seed", type=int, default=0, help="prompt order")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")
    parser.add_argument("--tag", default="", help="suffix of the result file names")


def run(args: argparse.Namespace) -> int:
    """Start the server, soak it, stop it; write JSON and a PNG under --out. Exit 1 on a missed target."""
    from lape_awq.server.serve_process import ServeProcess

    if min(args.clients, args.duration, args.swap_every, args.chaos_every, args.window, args.max_tokens) <= 0:
        raise UserError(
            "--clients, --duration, --swap-every, --chaos-every, --window, --max-tokens must be > 0"
        )
    if args.checkpoints is None:
        from lape_awq.quant.awq.default_checkpoints import ensure_default_checkpoints

        built = ensure_default_checkpoints(("awq-opt", "awq"))
        args.checkpoints = [built["awq-opt"], built["awq"]]
    if len(args.checkpoints) != 2:
        raise UserError(
            f"give --checkpoint twice (the two the name alternates between), got {len(args.checkpoints)}"
        )
    checkpoints = [path.expanduser().resolve() for path in args.checkpoints]
    keys = {"user": secrets.token_hex(8), "admin": secrets.token_hex(8)}
    serve_args = [
        "--api-key",
        keys["user"],
        "--admin-key",
        keys["admin"],
        "--kv-cache-gib",
        str(args.kv_cache_gib),
    ]
    for path in checkpoints:
        serve_args += ["--checkpoint-root", str(path.parent)]
    stamp = result_header("soak")
    tag = f"_{args.tag}" if args.tag else ""
    stem = f"soak_{stamp['date'][:10]}{tag}"
    server = ServeProcess([(NAME, checkpoints[0])], serve_args, args.out / f"{stem}.server.log")
    try:
        reason = server.wait_ready(900)
        if reason is not None:
            raise UserError(f"the server did not start: {reason}")
        origin = time.perf_counter()
        rss = RssSampler(server.process.pid, origin)
        every = f"a swap every {args.swap_every:g} s"
        print(f"soak: {args.clients} clients on {NAME} for {args.duration:g} s, {every}")
        outcome = asyncio.run(soak(args, server.root, keys, checkpoints))
        series = rss.stop()
    finally:
        server.stop()
    samples: list[RequestSample] = outcome["samples"]
    failed = [s for s in samples if not s.ok]
    steady = steady_samples(series, outcome["swaps"], args.rss_warmup)
    trend = rss_trend(steady)
    end = outcome["end"]
    verdicts = {
        "no_failed_requests": not failed,
        "swaps_all_ok": all(swap["status"] == 200 for swap in outcome["swaps"]),
        "mistakes_all_4xx": all(m["ok"] for m in outcome["mistakes"]),
        "rss_flat": trend["percent_per_10min"] is not None and trend["percent_per_10min"] < 1.0,
        "nothing_held_at_end": end["leases_held"] == 0 and end["engine_requests"] == 0,
    }
    record = {
        **stamp,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "run")}
        | {"checkpoints": [str(p) for p in checkpoints]},
        "summary": {
            "requests": len(samples),
            "failed": len(failed),
            "output_tokens": sum(s.output_tokens for s in samples if s.ok),
            "ttft": percentiles([s.ttft for s in samples if s.ok and s.ttft is not None]),
            "e2el": percentiles([s.latency for s in samples if s.ok and s.latency is not None]),
            "elapsed_s": outcome["elapsed"],
        },
        "verdicts": verdicts,
        "end": end,
        "swaps": outcome["swaps"],
        "mistakes": outcome["mistakes"],
        "windows": windows(samples, args.window, args.duration),
        "rss": {"series": series, "steady": steady, "trend": trend},
        "errors": sorted({s.error for s in failed if s.error})[:20],
        "samples": [
            {k: v for k, v in asdict(s).items() if k != "itl"} for s in samples
        ],  # ITL gaps left out: tens of thousands of numbers the windows already summarize
    }
    path = write_json(args.out / f"{stem}.json", record, 1)
    plot_soak(record, args.out / f"{stem}.png")
    print(
        json.dumps({"summary": record["summary"], "verdicts": verdicts, "end": end, "rss": trend}, indent=2)
    )
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
