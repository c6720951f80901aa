"""Served model names -> engines, with leases so that swaps and unloads never cut a request short.

A request takes a lease on the engine that serves its name at that moment and keeps it until its last
byte is sent. A swap starts the new engine while the old one keeps serving, then routes new requests to
the new one; the old engine is shut down once its last lease is returned. A failed start changes nothing.

An engine whose processes die is found by `watch` (and by the next request, which gets a 503 at once): it
is reported once (log, metric callback) and stays listed as `dead` until an admin reloads or swaps it, or,
with `restart_dead`, until the registry restarts it with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lape_awq.server.checkpoint_roots import CheckpointRoots
from lape_awq.server.engines import EngineOptions, LoadedEngine, LoadError, release_engine_memory
from lape_awq.server.openai_errors import ApiError

log = logging.getLogger("lape_awq.server")

StartEngine = Callable[[str, Path, EngineOptions], Awaitable[LoadedEngine]]
RESTART_BACKOFF = (2.0, 4.0, 8.0, 16.0, 32.0)  # seconds before each automatic restart attempt


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

    def __init__(
        self,
        start_engine: StartEngine,
        max_in_flight: int = 256,
        drain_timeout: float = 600.0,
        roots: CheckpointRoots | None = None,
        restart_dead: bool = False,
    ):
        self._start_engine = start_engine
        self.max_in_flight = max_in_flight
        self.drain_timeout = drain_timeout
        self.roots = roots or CheckpointRoots(())
        self.restart_dead = restart_dead
        self.on_death: Callable[[str], None] = lambda name: None  # told each death once (the metrics)
        self.slots: dict[str, Slot] = {}
        self.draining: list[LoadedEngine] = []
        self._drains: set[asyncio.Task] = set()  # old engines waiting for their last lease
        self._restarts: set[asyncio.Task] = set()  # dead engines being restarted (restart_dead)
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
            self._report_death(slot.name, engine)
            raise ApiError(
                503,
                f"The engine serving `{name}` has died; an admin can reload it "
                f"(POST /admin/models/{name}/swap), or retry after an automatic restart.",
                "model",
                "engine_dead",
            )
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

    async def swap(
        self, name: str, checkpoint: Path | None, options: EngineOptions | None = None
    ) -> LoadedEngine:
        """Put `checkpoint` behind `name` (None: the current one again) with `options` (None: the current
        engine's); in-flight requests finish on the old engine, which then stops."""
        slot = self.slot(name)
        async with slot.lock:
            if checkpoint is None or options is None:
                if slot.active is None:
                    raise LoadError(f"`{name}` has no checkpoint to reload; name one")
                checkpoint = checkpoint or slot.active.checkpoint
                options = options or slot.active.options
            new = await self._start(slot, checkpoint, options)
            old, slot.active = slot.active, new
            if old is not None:
                self._retire(old)
        log.info("swapped %s to %s (%s)", name, new.checkpoint, new.quant_method)
        return new

    async def unload(self, name: str) -> None:
        """Stop routing `name` now; its engine stops once its in-flight requests are done."""
        slot = self.slot(name)
        async with slot.lock:
            if self.slots.get(name) is slot:
                del self.slots[name]
            if slot.active is not None:
                self._retire(slot.active)

    def slot(self, name: str) -> Slot:
        """The slot serving `name`; 404 when none does."""
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
            # A start that failed late had loaded a tokenizer into vLLM's caches, as a stopped engine has.
            await asyncio.to_thread(release_engine_memory)
            raise
        finally:
            slot.pending = None
        slot.last_error = None
        engine.label = self.roots.label(engine.checkpoint)
        log.info("%s: %s ready in %.1f s", slot.name, checkpoint, time.perf_counter() - started)
        return engine

    def _retire(self, engine: LoadedEngine) -> None:
        engine.retired = True
        if engine.in_flight == 0:
            engine.drained.set()
        self.draining.append(engine)
        self._spawn(self._stop_when_drained(engine), self._drains)

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
        del engine  # the last reference: what the engine held can be freed now
        await asyncio.to_thread(release_engine_memory)

    # --- dead engines ---------------------------------------------------------------------------------

    def _report_death(self, name: str, engine: LoadedEngine) -> None:
        """Log and count an engine's death once; with `restart_dead`, start restarting it."""
        if engine.death_seen:
            return
        engine.death_seen = True
        log.error("%s: the engine serving %s died; requests to it get 503", name, engine.checkpoint)
        self.on_death(name)
        if self.restart_dead:
            self._spawn(self._restart(name, engine), self._restarts)

    async def watch(self, interval: float = 1.0) -> None:
        """Run until cancelled: report engines that died (a request would find them too, but an idle name
        must show up as dead in /health and the metrics as well)."""
        while True:
            for slot in list(self.slots.values()):
                if slot.active is not None and not slot.active.healthy:
                    self._report_death(slot.name, slot.active)
            await asyncio.sleep(interval)

    async def _restart(self, name: str, dead: LoadedEngine) -> None:
        for attempt, delay in enumerate(RESTART_BACKOFF, 1):
            await asyncio.sleep(delay)
            slot = self.slots.get(name)
            if slot is None or slot.active is not dead:  # unloaded, or an admin already replaced it
                return
            try:
                await self.swap(name, None)
                return
            except LoadError as error:
                log.warning("%s: restart %d of %d failed: %s", name, attempt, len(RESTART_BACKOFF), error)
        log.error("%s: not restarted after %d attempts; an admin must reload it", name, len(RESTART_BACKOFF))

    @staticmethod
    def _spawn(work: Awaitable[None], tasks: set[asyncio.Task]) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)  # held: the event loop keeps only weak references to tasks
        task.add_done_callback(tasks.discard)

    async def close(self) -> None:
        """Stop every engine (server shutdown)."""
        for name in list(self.slots):
            await self.unload(name)
        for engine in list(self.draining):
            engine.drained.set()
        for task in self._restarts:
            task.cancel()
        await asyncio.gather(*self._restarts, *self._drains, return_exceptions=True)

    # --- views ----------------------------------------------------------------------------------------

    def describe(self, admin: bool = False) -> list[dict[str, Any]]:
        """Every served name with its state and checkpoint (its public label), for /v1/models and /health;
        `admin` adds what only the operator may see: paths, the last load error, engine options and
        processes."""
        rows = []
        for slot in self.slots.values():
            engine = slot.active
            row = {
                "id": slot.name,
                "object": "model",
                "created": int(engine.loaded_at if engine else time.time()),
                "owned_by": "lape-awq",
                "state": slot.state,
                "checkpoint": engine.label if engine else None,
                "quant_method": engine.quant_method if engine else None,
                "max_model_len": engine.max_model_len if engine else None,
            }
            if admin:
                row |= {
                    "checkpoint_path": str(engine.checkpoint) if engine else None,
                    "engine_quantization": engine.engine_quantization if engine else None,
                    "options": asdict(engine.options) if engine else None,
                    "pids": engine.pids if engine else [],
                    "in_flight": engine.in_flight if engine else 0,
                    "pending_checkpoint": str(slot.pending) if slot.pending else None,
                    "last_error": slot.last_error,
                }
            rows.append(row)
        return rows

    def engine_snapshot(self) -> Iterator[tuple[str, str, str, int, int]]:
        """(name, checkpoint label, state, leases held, requests inside the engine) for every engine, draining
        ones included: the metrics' engine gauges, read at scrape time."""
        for slot in self.slots.values():
            if slot.active is not None:
                engine = slot.active
                yield (
                    slot.name,
                    engine.label,
                    slot.state,
                    engine.in_flight,
                    engine.client.get_num_unfinished_requests(),
                )
        for engine in self.draining:
            yield (
                engine.name,
                engine.label,
                "draining",
                engine.in_flight,
                engine.client.get_num_unfinished_requests(),
            )
