"""A transparent wrapper around a vLLM engine client that watches each request's outputs.

vLLM's serving layer calls `engine_client.generate(...)`; wrapping that one method gives exact token
counts and the time of the first generated token for the metrics, without parsing response bodies.
"""

from __future__ import annotations

import contextvars
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestObservation:
    """What one HTTP request's generation produced; filled in while it streams."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    prompt_tokens: int = 0
    finished: bool = False
    # (generate call, completion index) -> tokens so far; a request may make several generate calls
    tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    calls: set[int] = field(default_factory=set)

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens.values())


CURRENT_REQUEST: contextvars.ContextVar[RequestObservation | None] = contextvars.ContextVar(
    "lape_awq_current_request", default=None
)


class ObservedEngine:
    """Delegates everything to `engine`; `generate` also records into the current request's observation."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._calls = itertools.count()

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.engine, attribute)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        observation = CURRENT_REQUEST.get()
        params = kwargs.get("sampling_params", args[1] if len(args) > 1 else None)
        delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA
        call = next(self._calls)
        async for output in self.engine.generate(*args, **kwargs):
            if observation is not None:
                _record(observation, output, call, delta)
            yield output


def _record(observation: RequestObservation, output: Any, call: int, delta: bool) -> None:
    if call not in observation.calls and output.prompt_token_ids is not None:
        observation.calls.add(call)
        observation.prompt_tokens += len(output.prompt_token_ids)
    for completion in output.outputs:
        key, tokens = (call, completion.index), len(completion.token_ids)
        observation.tokens[key] = observation.tokens.get(key, 0) + tokens if delta else tokens
    if observation.first_token is None and observation.completion_tokens:
        observation.first_token = time.perf_counter()
    observation.finished = bool(output.finished)
