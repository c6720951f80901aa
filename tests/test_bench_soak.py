"""The soak benchmark's arithmetic: the RSS trend, the latency windows, Prometheus totals. (The soak itself
is a benchmark, run against a real server for minutes: `lape-awq bench soak`.)"""

from __future__ import annotations

import pytest

from lape_awq.bench.formatting import MiB
from lape_awq.bench.serve_load import RequestSample
from lape_awq.bench.soak import SWAP_SETTLE_S, metric_total, rss_trend, steady_samples, windows


def test_rss_trend_is_the_slope_outside_warmup_and_swaps_per_ten_minutes() -> None:
    # 100 MiB of start-up growth in the first minute, then +1 MiB per minute from 1000 MiB, and a swap at
    # 600 s (40 s long) during which a second engine adds 2 GiB: both left out of the trend
    swap = {"at_s": 600.0, "seconds": 40.0}
    series = [(t, int((900 + t / 60 * 100) * MiB)) for t in range(0, 60, 5)]
    for t in range(60, 1800, 5):
        second_engine = 2048 if 600 <= t <= 640 + SWAP_SETTLE_S else 0
        series.append((t, int((1000 + (t - 60) / 60 + second_engine) * MiB)))
    steady = steady_samples(series, [swap], warmup=60)
    assert all(t >= 60 and not 600 <= t <= 640 + SWAP_SETTLE_S for t, _ in steady)
    trend = rss_trend(steady)
    assert trend["mib_per_10min"] == pytest.approx(10.0, rel=1e-6)
    assert trend["percent_per_10min"] == pytest.approx(100 * 10 / trend["mean_mib"], rel=1e-6)
    skewed = rss_trend(steady_samples(series, [], warmup=60))["mib_per_10min"]
    assert abs(skewed - 10.0) > 5  # the swap's second engine would skew it
    flat = rss_trend([(t, 2000 * MiB) for t in range(60, 600, 5)])
    assert flat["mib_per_10min"] == pytest.approx(0.0, abs=1e-9)
    assert rss_trend(steady[:2])["mib_per_10min"] is None  # too few samples


def test_windows_count_by_send_time() -> None:
    samples = [
        RequestSample(ok=True, ttft=0.1, latency=1.0, output_tokens=64, sent=5.0),
        RequestSample(ok=True, ttft=0.3, latency=2.0, output_tokens=64, sent=59.9),
        RequestSample(ok=False, error="HTTP 503", sent=61.0),
    ]
    first, second = windows(samples, 60.0, 120.0)
    assert (first["completed"], first["failed"], second["completed"], second["failed"]) == (2, 0, 0, 1)
    assert first["output_throughput"] == pytest.approx(128 / 60)
    assert first["ttft"]["median_ms"] == pytest.approx(200.0)
    assert second["e2el"]["median_ms"] is None


def test_metric_total_sums_every_label_set() -> None:
    text = (
        "# HELP lape_awq_in_flight_requests x\n"
        'lape_awq_in_flight_requests{model="a",checkpoint="c"} 2.0\n'
        'lape_awq_in_flight_requests{model="b",checkpoint="d"} 1.0\n'
        'lape_awq_in_flight_requests_other{model="b"} 7.0\n'
    )
    assert metric_total(text, "lape_awq_in_flight_requests") == 3.0
    assert metric_total(text, "lape_awq_missing") == 0.0
