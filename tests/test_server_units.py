"""Server parts without engines: the registry (routing, leases, swap/unload order), engine options, and
`serve`'s argument checks. The registry runs with engines that start instantly.

The engines here are stand-ins for vLLM's AsyncLLM (only `errored` and `shutdown` are touched by the
registry); everything else is the real registry. The real engines are exercised in test_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from starlette.datastructures import State

from lape_awq.server.engine_observer import ObservedEngine
from lape_awq.server.engines import EngineOptions, LoadedEngine, LoadError
from lape_awq.server.openai_errors import ApiError
from lape_awq.server.registry import ModelRegistry


class InstantEngine:
    """An engine stand-in recording its shutdown."""

    def __init__(self) -> None:
        self.errored = False
        self.stopped = False

    def shutdown(self) -> None:
        self.stopped = True

    def get_num_unfinished_requests(self) -> int:
        return 0


def make_registry(max_in_flight: int = 4, gate: asyncio.Event | None = None) -> ModelRegistry:
    async def start(name: str, checkpoint: Path, options: EngineOptions) -> LoadedEngine:
        if gate is not None:
            await gate.wait()
        if checkpoint.name == "broken":
            raise LoadError("config.json is unreadable")
        client = ObservedEngine(InstantEngine())
        return LoadedEngine(name, checkpoint, "awq", "lape_awq", client, State(), 512)

    return ModelRegistry(start, max_in_flight=max_in_flight, drain_timeout=5)


def run(coro):
    return asyncio.run(coro)


def test_leases_route_count_and_limit() -> None:
    async def scenario() -> None:
        registry = make_registry(max_in_flight=2)
        await registry.load("chat", Path("/ckpt/a"), EngineOptions())
        first, second = registry.lease("chat"), registry.lease("chat")
        with pytest.raises(ApiError) as raised:
            registry.lease("chat")
        assert raised.value.status == 429
        first.release()
        first.release()  # idempotent
        assert registry.slots["chat"].active.in_flight == 1
        registry.lease("chat").release()
        second.release()
        with pytest.raises(ApiError) as raised:
            registry.lease("other")
        assert raised.value.status == 404 and "chat" in raised.value.message
        assert registry.default_name() == "chat"

    run(scenario())


def test_a_loading_name_is_listed_and_answers_503() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        registry = make_registry(gate=gate)
        loading = asyncio.create_task(registry.load("chat", Path("/ckpt/a"), EngineOptions()))
        await asyncio.sleep(0)
        assert registry.describe()[0]["state"] == "loading"
        with pytest.raises(ApiError) as raised:
            registry.lease("chat")
        assert raised.value.status == 503
        gate.set()
        await loading
        assert registry.describe()[0]["state"] == "ready"

    run(scenario())


def test_swap_drains_the_old_engine_before_stopping_it() -> None:
    async def scenario() -> None:
        registry = make_registry()
        old = await registry.load("chat", Path("/ckpt/awq"), EngineOptions())
        in_flight = registry.lease("chat")
        new = await registry.swap("chat", Path("/ckpt/awq-opt"), EngineOptions())
        assert registry.lease("chat").engine is new  # new requests go to the new engine at once
        await asyncio.sleep(0.05)
        assert not old.client.engine.stopped and registry.draining == [old]
        in_flight.release()  # the last request on the old engine finishes
        await asyncio.sleep(0.05)
        assert old.client.engine.stopped and registry.draining == []
        assert not new.client.engine.stopped

    run(scenario())


def test_a_failed_swap_leaves_the_old_engine_serving() -> None:
    async def scenario() -> None:
        registry = make_registry()
        old = await registry.load("chat", Path("/ckpt/awq"), EngineOptions())
        with pytest.raises(LoadError):
            await registry.swap("chat", Path("/ckpt/broken"), EngineOptions())
        assert registry.lease("chat").engine is old
        row = registry.describe()[0]
        assert row["state"] == "ready" and "unreadable" in row["last_error"]
        with pytest.raises(LoadError):
            await registry.load("fresh", Path("/ckpt/broken"), EngineOptions())
        assert "fresh" not in registry.slots

    run(scenario())


def test_unload_stops_routing_and_then_the_engine() -> None:
    async def scenario() -> None:
        registry = make_registry()
        engine = await registry.load("chat", Path("/ckpt/awq"), EngineOptions())
        with pytest.raises(ApiError) as raised:
            await registry.load("chat", Path("/ckpt/awq"), EngineOptions())
        assert raised.value.status == 409
        lease = registry.lease("chat")
        await registry.unload("chat")
        with pytest.raises(ApiError):
            registry.lease("chat")
        assert not engine.client.engine.stopped
        lease.release()
        await registry.close()
        assert engine.client.engine.stopped

    run(scenario())


def test_engine_options_are_type_checked() -> None:
    options = EngineOptions()
    assert options.with_updates({"kv_cache_gib": 2, "max_model_len": 256}).max_model_len == 256
    for bad, message in (
        ({"kv_cache_gib": "lots"}, "kv_cache_gib"),
        ({"max_num_seqs": 0}, ">= 1"),
        ({"color": "red"}, "unknown engine option"),
        ({"dtype": 5}, "dtype"),
    ):
        with pytest.raises(LoadError, match=message):
            options.with_updates(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-equals-sign"], "expected NAME=PATH"),
        (["--model", "chat=/nonexistent/dir"], "not a model directory"),
        (["--model", "a=/x", "--model", "a=/y"], "names must be distinct"),
        (["--kv-cache-gib", "0", "--model", "a=/x"], "kv_cache_gib must be > 0"),
    ],
)
def test_serve_refuses_bad_arguments_before_starting_anything(argv, message, capsys, tmp_path) -> None:
    from lape_awq.quant.cli.main import main

    (tmp_path / "config.json").write_text("{}")
    argv = [a.replace("/x", str(tmp_path)).replace("/y", str(tmp_path)) for a in argv]
    # argparse rejects a malformed NAME=PATH itself (exit 2); the rest are lape-awq's UserErrors (status 2)
    refused = pytest.raises(SystemExit) if "NAME=PATH" in message else contextlib.nullcontext()
    with refused:
        assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        ("[1, 2]", EngineOptions(), "not a JSON object"),
        ("{not json", EngineOptions(), "unreadable"),
        ('{"model_type": "llama"}', EngineOptions(dtype="float7"), "vLLM refused the engine options"),
    ],
)
def test_a_checkpoint_or_options_vllm_cannot_take_is_a_load_error(tmp_path, config, options, message) -> None:
    """Never an exception that escapes the admin API as a 500 (or an argparse exit that stops the server)."""
    from lape_awq.server.engines import start_engine

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(LoadError, match=message):
        asyncio.run(start_engine("x", tmp_path, options))


@pytest.mark.parametrize(
    ("cores", "tensor_parallel", "environ", "expected"),
    [
        (2, 1, {}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
        (4, 1, {"PATH": "/bin"}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
        (16, 1, {}, {}),  # a reserved core is a small share of a big CPU: vLLM's default stands
        (2, 2, {}, {}),  # tensor parallel: the user binds ranks to cores
        (2, 1, {"VLLM_CPU_OMP_THREADS_BIND": "0"}, {}),  # the user's own choices win
        (2, 1, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, {}),
    ],
)
def test_small_cpus_reserve_no_core_for_the_scheduler(
    monkeypatch: pytest.MonkeyPatch, cores: int, tensor_parallel: int, environ: dict, expected: dict
) -> None:
    import os

    import torch

    from lape_awq.server.engines import cpu_engine_env

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_engine_env(tensor_parallel, environ) == expected
