"""Served model names -> engines, with leases so that swaps and unloads never cut a request short.

A request takes a lease on the engine that serves its name at that moment and keeps it until its last
byte is sent. A swap starts the new engine while the old one keeps serving, then routes new requests to
the new one; the old engine is shut down once its last lease is returned. A failed start changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lape_awq.server.engines import EngineOptions, LoadedEngine, LoadError
from lape_awq.server.openai_errors import ApiError

log = logging.getLogger("lape_awq.server")

StartEngine = Callable[[str, Path, EngineOptions], Awaitable[LoadedEngine]]


@dataclass
class Slot:
    """One served name: the engine answering it, and what is happening to it."""

    name: str
    active: LoadedEngine | None = None
    pending: Path | None = None  # checkpoint being started for this name
    last_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def state(self) -> str:
        if self.active is None:
            return "loading" if self.pending else "failed"
        if not self.active.healthy:
            return "dead"
        return "swapping" if self.pending else "ready"


@dataclass
class Lease:
    """A request's hold on one engine; `release` is idempotent."""

    engine: LoadedEngine
    on_release: Callable[[LoadedEngine], None]
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.on_release(self.engine)


class ModelRegistry:
    """Routes names to engines; load / swap / unload are serialized per name."""

    def __init__(self, start_engine: StartEngine, max_in_flight: int = 256, drain_timeout: float = 600.0):
        self._start_engine = start_engine
        self.max_in_flight = max_in_flight
        self.drain_timeout = drain_timeout
        self.slots: dict[str, Slot] = {}
        self.draining: list[LoadedEngine] = []
        self._tasks: set[asyncio.Task] = set()
        # Engine starts compete for the same cores and memory; one at a time keeps each start predictable.
        self._start_lock = asyncio.Lock()

    # --- requests -------------------------------------------------------------------------------------

    def lease(self, name: str) -> Lease:
        """The engine serving `name` now, held until `release`; 404 / 503 / 429 otherwise."""
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            message = f"The model `{name}` does not exist (served: {known})."
            raise ApiError(404, message, "model", "model_not_found")
        engine = slot.active
        if engine is None:
            message = f"The model `{name}` is still loading; retry shortly."
            raise ApiError(503, message, "model", "model_loading")
        if not engine.healthy:
            raise ApiError(503, f"The engine serving `{name}` has stopped; an admin must reload it.", "model")
        if engine.in_flight >= self.max_in_flight:
            raise ApiError(
                429,
                f"`{name}` is serving {engine.in_flight} requests, its limit; retry later.",
                "model",
                "rate_limit_exceeded",
            )
        engine.in_flight += 1
        return Lease(engine, self._returned)

    def _returned(self, engine: LoadedEngine) -> None:
        engine.in_flight -= 1
        if engine.retired and engine.in_flight == 0:
            engine.drained.set()

    def default_name(self) -> str | None:
        """The name to use when a request gives none: only when exactly one model is served."""
        return next(iter(self.slots)) if len(self.slots) == 1 else None

    # --- admin ----------------------------------------------------------------------------------------

    async def load(self, name: str, checkpoint: Path, options: EngineOptions) -> LoadedEngine:
        """Serve `checkpoint` under a new `name`; the name is listed as loading until it is ready."""
        if name in self.slots:
            raise ApiError(409, f"`{name}` is already served; swap it or unload it first.", "name")
        slot = self.slots[name] = Slot(name)
        async with slot.lock:
            try:
                slot.active = await self._start(slot, checkpoint, options)
            except LoadError:
                if slot.active is None and self.slots.get(name) is slot:
                    del self.slots[name]
                raise
        return slot.active

    async def swap(self, name: str, checkpoint: Path, options: EngineOptions) -> LoadedEngine:
        """Put `checkpoint` behind `name`; in-flight requests finish on the old engine, which then stops."""
        slot = self._slot(name)
        async with slot.lock:
            new = await self._start(slot, checkpoint, options)
            old, slot.active = slot.active, new
            if old is not None:
                self._retire(old)
        log.info("swapped %s to %s (%s)", name, new.checkpoint, new.quant_method)
        return new

    async def unload(self, name: str) -> None:
        """Stop routing `name` now; its engine stops once its in-flight requests are done."""
        slot = self._slot(name)
        async with slot.lock:
            if self.slots.get(name) is slot:
                del self.slots[name]
            if slot.active is not None:
                self._retire(slot.active)

    def _slot(self, name: str) -> Slot:
        if name not in self.slots:
            raise ApiError(404, f"The model `{name}` does not exist.", "name", "model_not_found")
        return self.slots[name]

    async def _start(self, slot: Slot, checkpoint: Path, options: EngineOptions) -> LoadedEngine:
        slot.pending = checkpoint
        started = time.perf_counter()
        try:
            async with self._start_lock:
                engine = await self._start_engine(slot.name, checkpoint, options)
        except LoadError as error:
            slot.last_error = str(error)
            log.warning("loading %s for %s failed: %s", checkpoint, slot.name, error)
            raise
        finally:
            slot.pending = None
        slot.last_error = None
        log.info("%s: %s ready in %.1f s", slot.name, checkpoint, time.perf_counter() - started)
        return engine

    def _retire(self, engine: LoadedEngine) -> None:
        engine.retired = True
        if engine.in_flight == 0:
            engine.drained.set()
        self.draining.append(engine)
        task = asyncio.create_task(self._stop_when_drained(engine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop_when_drained(self, engine: LoadedEngine) -> None:
        try:
            await asyncio.wait_for(engine.drained.wait(), self.drain_timeout)
        except asyncio.TimeoutError:
            log.warning(
                "%s: %d requests still running after %.0f s; stopping the old engine anyway",
                engine.name,
                engine.in_flight,
                self.drain_timeout,
            )
        try:
            await engine.shutdown()
        finally:
            self.draining.remove(engine)

    async def close(self) -> None:
        """Stop every engine (server shutdown)."""
        for name in list(self.slots):
            await self.unload(name)
        for engine in list(self.draining):
            engine.drained.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- views ----------------------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """The truth about every served name, for /v1/models, /health and the admin API."""
        rows = []
        for slot in self.slots.values():
            engine = slot.active
            rows.append(
                {
                    "id": slot.name,
                    "object": "model",
                    "created": int(engine.loaded_at if engine else time.time()),
                    "owned_by": "lape-awq",
                    "state": slot.state,
                    "checkpoint": str(engine.checkpoint) if engine else None,
                    "quant_method": engine.quant_method if engine else None,
                    "engine_quantization": engine.engine_quantization if engine else None,
                    "max_model_len": engine.max_model_len if engine else None,
                    "pending_checkpoint": str(slot.pending) if slot.pending else None,
                    "last_error": slot.last_error,
                }
            )
        return rows

    def engine_snapshot(self) -> Iterator[tuple[str, str, str, int, int]]:
        """(name, checkpoint, state, leases held, requests inside the engine) for every engine, draining
        ones included: the metrics' engine gauges, read at scrape time."""
        for slot in self.slots.values():
            if slot.active is not None:
                engine = slot.active
                yield (
                    slot.name,
                    str(engine.checkpoint),
                    slot.state,
                    engine.in_flight,
                    engine.client.get_num_unfinished_requests(),
                )
        for engine in self.draining:
            yield (
                engine.name,
                str(engine.checkpoint),
                "draining",
                engine.in_flight,
                engine.client.get_num_unfinished_requests(),
            )
