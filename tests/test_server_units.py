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
        return LoadedEngine(name, checkpoint, "awq", "lape_awq", client, State(), 512, options)

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
        row = registry.describe(admin=True)[0]
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


# --- dead engines -----------------------------------------------------------------------------------------


def test_a_dead_engine_answers_503_is_reported_once_and_reloads() -> None:
    async def scenario() -> None:
        registry = make_registry()
        deaths: list[str] = []
        registry.on_death = deaths.append
        engine = await registry.load("chat", Path("/ckpt/awq"), EngineOptions(max_num_seqs=3))
        await registry.load("other", Path("/ckpt/other"), EngineOptions())
        engine.client.engine.errored = True  # its processes died
        watcher = asyncio.create_task(registry.watch(interval=0.01))
        await asyncio.sleep(0.05)
        assert deaths == ["chat"]  # found while idle, reported once
        for _ in range(2):
            with pytest.raises(ApiError) as raised:
                registry.lease("chat")
            assert raised.value.status == 503 and "swap" in raised.value.message
        assert deaths == ["chat"]
        registry.lease("other").release()  # other names keep serving
        assert {row["id"]: row["state"] for row in registry.describe()} == {"chat": "dead", "other": "ready"}
        reloaded = await registry.swap("chat", None)  # no checkpoint, no options: reload as it was
        assert reloaded.checkpoint == Path("/ckpt/awq") and reloaded.options.max_num_seqs == 3
        registry.lease("chat").release()
        watcher.cancel()
        await registry.close()

    run(scenario())


def test_restart_dead_restarts_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    import lape_awq.server.registry as registry_module

    monkeypatch.setattr(registry_module, "RESTART_BACKOFF", (0.01, 0.01))

    async def scenario() -> None:
        registry = make_registry()
        registry.restart_dead = True
        engine = await registry.load("chat", Path("/ckpt/awq"), EngineOptions())
        engine.client.engine.errored = True
        with pytest.raises(ApiError):
            registry.lease("chat")
        await asyncio.sleep(0.2)
        assert registry.slots["chat"].active is not engine
        registry.lease("chat").release()
        assert engine.client.engine.stopped  # the dead one was shut down
        await registry.close()

    run(scenario())


def test_the_public_model_list_carries_no_paths_or_errors() -> None:
    from lape_awq.server.checkpoint_roots import CheckpointRoots

    async def scenario() -> None:
        registry = make_registry()
        registry.roots = CheckpointRoots.of([Path("/srv/models")])
        await registry.load("chat", Path("/srv/models/team/awq"), EngineOptions())
        with pytest.raises(LoadError):
            await registry.swap("chat", Path("/srv/models/broken"), EngineOptions())
        public, admin = registry.describe()[0], registry.describe(admin=True)[0]
        assert public["checkpoint"] == "team/awq" and "/srv" not in repr(public)
        assert admin["checkpoint_path"] == "/srv/models/team/awq" and "unreadable" in admin["last_error"]
        await registry.close()

    run(scenario())


# --- checkpoint roots and engine options ---------------------------------------------------------------


def test_checkpoint_roots_resolve_links_and_dots_before_deciding(tmp_path: Path) -> None:
    from lape_awq.server.checkpoint_roots import CheckpointRoots, OutsideRoots

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "team" / "awq").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    roots = CheckpointRoots.of([root])
    assert roots.allowed(root / "team" / "awq") == (root / "team" / "awq").resolve()
    assert roots.label((root / "team" / "awq").resolve()) == "team/awq"
    assert roots.label(outside.resolve()) == "outside"
    for sneaky in (outside, root / "escape", root / "team" / ".." / ".." / "outside", root / ".."):
        with pytest.raises(OutsideRoots, match="outside the checkpoint roots"):
            roots.allowed(sneaky)
    with pytest.raises(OutsideRoots, match=r"\(none\)"):
        CheckpointRoots(()).allowed(root)


@pytest.mark.parametrize(
    ("options", "config", "message"),
    [
        (EngineOptions(kv_cache_gib=100_000), {}, "kv_cache_gib=100000 is more than"),
        (EngineOptions(tensor_parallel_size=4096), {}, "tensor_parallel_size=4096 needs more than"),
        (EngineOptions(max_model_len=70_000), {"max_position_embeddings": 32768}, "context of 32768"),
        (
            EngineOptions(max_model_len=300_000),
            {"text_config": {"max_position_embeddings": 32768, "rope_scaling": {"factor": 8.0}}},
            "context of 262144",
        ),
    ],
)
def test_options_the_machine_or_model_cannot_honour_are_refused(options, config, message) -> None:
    from lape_awq.server.engines import OptionsRefused, check_options_fit

    with pytest.raises(OptionsRefused, match=message):
        check_options_fit(options, config)
    check_options_fit(EngineOptions(max_model_len=256, kv_cache_gib=0.5), {"max_position_embeddings": 512})


# --- one error shape --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client():
    """The real app and gateway over engines that start instantly (no model is ever called here)."""
    from fastapi.testclient import TestClient

    from lape_awq.server.app import ServerSettings, create_app

    app = create_app(ServerSettings(api_key="user", admin_key="admin"), make_registry())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


USER, ADMIN = {"Authorization": "Bearer user"}, {"Authorization": "Bearer admin"}
JSON = {**USER, "Content-Type": "application/json"}
CHAT_BODY = '{"model": "x", "messages": [{"role": "user", "content": "%s"}]%s}'
ERRORS = {
    "unknown route": ("GET", "/v1/nope", None, USER, 404, "no GET /v1/nope"),
    "unknown page": ("GET", "/nope", None, {}, 404, "no GET /nope"),
    "missing static file": ("GET", "/static/nope.js", None, {}, 404, "no GET"),
    "wrong method": ("DELETE", "/v1/chat/completions", None, USER, 405, "takes POST"),
    "broken JSON": ("POST", "/v1/chat/completions", '{"model": ', JSON, 400, "not valid JSON"),
    "no body": ("POST", "/v1/chat/completions", "", JSON, 400, "needs a JSON body"),
    "not an object": ("POST", "/v1/chat/completions", "[1, 2]", JSON, 400, "must be a JSON object"),
    "wrong field type": ("POST", "/v1/chat/completions", CHAT_BODY % ("hi", ', "n": "x"'), JSON, 400, "`n`"),
    "lone surrogate": ("POST", "/v1/chat/completions", CHAT_BODY % ("\\ud800", ""), JSON, 400, "surrogate"),
    "metrics without a key": ("GET", "/metrics", None, {}, 401, "API key"),
    "openapi without a key": ("GET", "/openapi.json", None, {}, 401, "API key"),
    "admin with the user key": ("GET", "/admin/models", None, USER, 401, "admin key"),
    "load outside the roots": (
        "POST",
        "/admin/models",
        '{"name": "n", "checkpoint": "/etc"}',
        {**ADMIN, "Content-Type": "application/json"},
        403,
        "outside the checkpoint roots",
    ),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_every_error_has_openai_shape_and_says_what_to_fix(app_client, case: str) -> None:
    method, path, body, headers, status, message = ERRORS[case]
    response = app_client.request(method, path, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    assert message in error["message"], error["message"]


def test_ops_routes_answer_with_a_key_and_health_without(app_client) -> None:
    assert app_client.get("/metrics", headers=USER).status_code == 200
    assert app_client.get("/openapi.json", headers=ADMIN).status_code == 200
    assert app_client.get("/health").status_code == 503  # no model served: degraded, but answered
    assert app_client.get("/docs").status_code == 404  # FastAPI's page would load scripts from a CDN
