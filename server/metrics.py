"""Prometheus metrics per served model: requests, errors, tokens, TTFT and latency, engine load.

A registry of its own (not prometheus_client's global one), so several apps can live in one process
(tests) and vLLM's own collectors never clash with ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lape_awq.server.engine_observer import RequestObservation

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
UNKNOWN_MODEL = "-"  # label for requests naming no served model (keeps label values bounded)


class _EngineGauges(Collector):
    """Read at scrape time from the registry's view: leases held and requests inside each engine, labelled
    by model and the checkpoint's public label."""

    def __init__(self, snapshot: Callable[[], Iterable[tuple[str, str, str, int, int]]]):
        self._snapshot = snapshot

    def collect(self):
        in_flight = GaugeMetricFamily(
            "lape_awq_in_flight_requests", "HTTP requests holding an engine", labels=["model", "checkpoint"]
        )
        unfinished = GaugeMetricFamily(
            "lape_awq_engine_unfinished_requests",
            "requests inside the vLLM engine (queued or generating)",
            labels=["model", "checkpoint"],
        )
        info = GaugeMetricFamily(
            "lape_awq_model_info",
            "served checkpoints (1 per engine)",
            labels=["model", "checkpoint", "state"],
        )
        for model, checkpoint, state, leases, inside in self._snapshot():
            in_flight.add_metric([model, checkpoint], leases)
            unfinished.add_metric([model, checkpoint], inside)
            info.add_metric([model, checkpoint, state], 1)
        yield from (in_flight, unfinished, info)


class ServerMetrics:
    """The server's metric families; `observe_request` is called once per finished HTTP request."""

    def __init__(self, engine_snapshot: Callable[[], Iterable[tuple[str, str, str, int, int]]]):
        self.registry = CollectorRegistry()
        labels = ["model", "endpoint"]
        self.requests = Counter(
            "lape_awq_requests", "finished API requests", [*labels, "status"], registry=self.registry
        )
        self.errors = Counter(
            "lape_awq_request_errors",
            "API requests answered with an error",
            [*labels, "status"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "lape_awq_cancelled_requests",
            "requests whose client went away before the end",
            labels,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lape_awq_prompt_tokens", "prompt tokens processed", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "lape_awq_generation_tokens", "tokens generated", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "lape_awq_time_to_first_token_seconds",
            "request arrival to first generated token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "lape_awq_request_latency_seconds",
            "request arrival to last byte",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.engine_deaths = Counter(
            "lape_awq_engine_deaths",
            "engines whose processes died while serving",
            ["model"],
            registry=self.registry,
        )
        self.stalled = Counter(
            "lape_awq_stalled_clients",
            "streams cancelled because the client stopped reading (send timeout)",
            labels,
            registry=self.registry,
        )
        self.registry.register(_EngineGauges(engine_snapshot))

    def count_engine_death(self, model: str) -> None:
        self.engine_deaths.labels(model).inc()

    def observe_request(
        self,
        model: str,
        endpoint: str,
        status: int,
        seconds: float,
        observation: RequestObservation | None,
        cancelled: bool,
        stalled: bool = False,
    ) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        if stalled:
            self.stalled.labels(model, endpoint).inc()
        if status >= 400:
            self.errors.labels(model, endpoint, str(status)).inc()
        if cancelled:
            self.cancelled.labels(model, endpoint).inc()
        self.latency.labels(model, endpoint).observe(seconds)
        if observation is not None:
            self.prompt_tokens.labels(model).inc(observation.prompt_tokens)
            self.generation_tokens.labels(model).inc(observation.completion_tokens)
            if observation.first_token is not None:
                self.ttft.labels(model).observe(observation.first_token - observation.started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
