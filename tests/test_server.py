"""The OpenAI-compatible server end to end: a real `lape-awq serve` process on 127.0.0.1 running real vLLM
engines on CPU over tiny checkpoints, driven by the official `openai` client (and raw httpx where the
client would refuse to send a bad request).

Served names: `korean-chat` (tiny Gemma 3 AWQ; swapped during the last tests), `tiny-opt` (its AWQ-opt),
`bytes` (the byte-cycle model, see server_models.py). Their checkpoints share one directory, which is
therefore the server's checkpoint root: admin loads come from there, and public answers name checkpoints
by their path under it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from browser import chromium, console_errors
from hypothesis import HealthCheck, settings
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from server_models import CYCLE_TEXT, write_byte_cycle_model, write_quantized_pair, write_verdict_judge

API_KEY, ADMIN_KEY = "user-key-123", "admin-key-456"
MAX_MODEL_LEN = 512
START_TIMEOUT = 600
SEND_TIMEOUT_S = 3
CHAT = [{"role": "user", "content": "한국어로 짧게 인사해 주세요."}]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    checkpoints: dict[str, Path]

    @property
    def root(self) -> Path:
        """The checkpoint root: the directory holding the command line's checkpoints."""
        return self.checkpoints["awq"].parent.resolve()

    def label(self, key: str) -> str:
        """The public name of a checkpoint: its path under the root."""
        return self.checkpoints[key].name

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(server: Server, names: set[str]) -> None:
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            health = httpx.get(f"{server.url}/health", timeout=5)
            if health.status_code == 200 and set(health.json()["models"]) == names:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"server not ready after {START_TIMEOUT} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    checkpoints = write_quantized_pair(root, tokenizer)
    checkpoints["bytes"] = write_byte_cycle_model(root / "byte-cycle", tokenizer)
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "lape_awq.quant.cli.main",
        "serve",
        "--port",
        str(port),
        "--model",
        f"korean-chat={checkpoints['awq']}",
        "--model",
        f"tiny-opt={checkpoints['awq-opt']}",
        "--model",
        f"bytes={checkpoints['bytes']}",
        "--api-key",
        API_KEY,
        "--admin-key",
        ADMIN_KEY,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-gib",
        "1",
        "--enforce-eager",
        "--max-body-mb",
        "1",
        "--send-timeout",
        str(SEND_TIMEOUT_S),
    ]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    log = root / "server.log"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    running = Server(f"http://127.0.0.1:{port}", process, log, checkpoints)
    try:
        _wait_ready(running, {"korean-chat", "tiny-opt", "bytes"})
        yield running
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the server's Prometheus output (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


# --- the OpenAI surface -------------------------------------------------------------------------------


def test_engines_on_a_small_cpu_compute_on_every_core(server: Server) -> None:
    """`lape-awq serve` gives vLLM's CPU engines every core of a small CPU (no core reserved for the
    scheduler): vLLM's own binding report, in the server log, for each engine."""
    from lape_awq.server.engines import cpu_engine_env

    if not cpu_engine_env(1):
        pytest.skip("not a small CPU, or the binding is set in the environment: vLLM's default applies")
    log = server.log.read_text(errors="replace")
    cores = sorted(os.sched_getaffinity(0))
    reserved = re.findall(r"reserve_cpu_num=(\d+)", log)
    bound = re.findall(r"local_rank=0, core ids=(\[[\d, ]*\])", log)
    worker_threads = re.findall(r"leaving Torch threads at (\d+)", log)
    assert len(reserved) >= 3, log[-3000:]  # korean-chat, tiny-opt, bytes (and any loaded since)
    assert set(reserved) == {"0"} and set(bound) == {str(cores)}
    assert len(worker_threads) == len(reserved) and set(worker_threads) == {str(len(cores))}


def test_models_lists_every_checkpoint_with_method_and_state(client: openai.OpenAI, server: Server) -> None:
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(models) == {"korean-chat", "tiny-opt", "bytes"}
    assert {k: m["quant_method"] for k, m in models.items()} == {
        "korean-chat": "awq",
        "tiny-opt": "lape_awq",
        "bytes": "none",
    }
    assert models["tiny-opt"]["checkpoint"] == server.label("awq-opt")
    assert all(m["state"] == "ready" and m["max_model_len"] == MAX_MODEL_LEN for m in models.values())
    assert client.models.retrieve("bytes").id == "bytes"
    admin = {m["id"]: m for m in _admin(server, "GET", "/models").json()["data"]}
    assert {k: m["engine_quantization"] for k, m in admin.items()} == {
        "korean-chat": "lape_awq",
        "tiny-opt": "lape_awq",
        "bytes": None,
    }
    assert admin["tiny-opt"]["checkpoint_path"] == str(server.checkpoints["awq-opt"].resolve())
    assert all(m["pids"] for m in admin.values())  # each engine's own processes, for the operator


def test_chat_reports_usage_length_and_the_checkpoint_that_answered(client: openai.OpenAI, server) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-opt", messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    reply = raw.parse()
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    assert raw.headers["x-lape-awq-checkpoint"] == server.label("awq-opt")
    assert raw.headers["x-lape-awq-quant-method"] == "lape_awq"


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="bytes", messages=CHAT, max_completion_tokens=5, temperature=0
    )
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_sampled_stream_equals_non_stream_for_the_same_seed(client: openai.OpenAI) -> None:
    request = dict(
        model="tiny-opt",
        messages=CHAT,
        max_tokens=12,
        temperature=0.9,
        top_p=0.95,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**request).choices[0].message.content
    usage = {"include_usage": True}
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options=usage))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert not chunks[-1].choices
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_korean_split_across_byte_tokens_streams_exactly(client: openai.OpenAI) -> None:
    """Every syllable is three byte tokens: no chunk may carry a replacement character or a partial one."""
    expected = CYCLE_TEXT * 3
    request = dict(model="bytes", messages=CHAT, max_tokens=27, temperature=0)
    assert client.chat.completions.create(**request).choices[0].message.content == expected
    stream = client.chat.completions.create(**request, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == expected
    assert all("\ufffd" not in piece for piece in pieces)
    completion = client.completions.create(
        model="bytes", prompt="안녕\n", max_tokens=9, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in completion) == CYCLE_TEXT


def test_stop_sequence_ends_with_finish_reason_stop(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="bytes", messages=CHAT, max_tokens=27, temperature=0, stop=["국"]
    )
    assert reply.choices[0].message.content == "한"
    assert reply.choices[0].finish_reason == "stop"


def test_n_choices_and_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        reply = client.chat.completions.create(
            model="korean-chat",
            messages=CHAT,
            n=3,
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        assert sorted(c.index for c in reply.choices) == [0, 1, 2]
        assert reply.usage.completion_tokens == 30
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = sample(11)
    assert sample(11) == first
    assert sample(12) != first
    assert len(set(first)) > 1  # three samples of a 262k-token distribution


def test_completions_echo_and_logprobs(client: openai.OpenAI) -> None:
    prompt = "서울의 날씨는"
    reply = client.completions.create(
        model="korean-chat",
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    choice = reply.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    assert choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == reply.usage.prompt_tokens + 4
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs if top)


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="korean-chat",
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for step in content:
        values = [t.logprob for t in step.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert step.top_logprobs[0].token == step.token and step.logprob == values[0] <= 0  # greedy


def test_penalties_reach_the_sampler(client: openai.OpenAI) -> None:
    def distinct_tokens(**penalties: float) -> int:
        reply = client.chat.completions.create(
            model="korean-chat",
            messages=CHAT,
            max_tokens=24,
            temperature=0,
            logprobs=True,
            extra_body={"ignore_eos": True},
            **penalties,
        )
        return len({step.token for step in reply.choices[0].logprobs.content})

    plain = distinct_tokens()
    assert plain < 24  # a tiny random model repeats itself ...
    assert distinct_tokens(presence_penalty=2.0, frequency_penalty=2.0) > plain  # ... unless penalised


# --- auth, errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "wrong-key"])
def test_missing_or_wrong_key_is_401(server: Server, key: str) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "unused", max_retries=0)
    if not key:  # the SDK always sends a key; send none at all through httpx
        response = httpx.get(f"{server.url}/v1/models")
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        return
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.models.list()
    assert raised.value.status_code == 401
    assert raised.value.body["type"] == "authentication_error"


def test_admin_routes_refuse_the_user_key(server: Server) -> None:
    response = httpx.get(f"{server.url}/admin/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 401
    assert "admin key" in response.json()["error"]["message"]
    ok = httpx.get(f"{server.url}/admin/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert ok.status_code == 200 and {m["id"] for m in ok.json()["data"]} >= {"korean-chat", "bytes"}


def _post(server: Server, path: str, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}{path}",
        content=content,
        timeout=120,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})},
    )


def _chat(**fields) -> str:
    return json.dumps({"model": "korean-chat", "messages": CHAT, "max_tokens": 4, **fields})


CLIENT_MISTAKES = {
    "malformed json": ("/v1/chat/completions", '{"model": "korean-chat", "messages": [', 400),
    "missing messages": ("/v1/chat/completions", json.dumps({"model": "korean-chat"}), 400),
    "missing prompt": ("/v1/completions", json.dumps({"model": "korean-chat"}), 400),
    "wrong type": ("/v1/chat/completions", _chat(temperature="hot"), 400),
    "messages not a list": ("/v1/chat/completions", _chat(messages="hi"), 400),
    "negative temperature": ("/v1/chat/completions", _chat(temperature=-1), 400),
    "top_p above 1": ("/v1/chat/completions", _chat(top_p=2), 400),
    "negative max_tokens": ("/v1/chat/completions", _chat(max_tokens=-5), 400),
    "n of zero": ("/v1/chat/completions", _chat(n=0), 400),
    "too many top_logprobs": ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=1000), 400),
    "prompt longer than the context": (
        "/v1/completions",
        json.dumps({"model": "korean-chat", "prompt": "서울 " * 600}),
        400,
    ),
    "max_tokens beyond the context": ("/v1/chat/completions", _chat(max_tokens=MAX_MODEL_LEN * 4), 400),
    "unknown model": ("/v1/chat/completions", _chat(model="no-such-model"), 404),
    "body over the limit": ("/v1/chat/completions", _chat(pad="x" * (2 << 20)), 413),
    "unknown route": ("/v1/chat/complete", _chat(), 404),
    "wrong method": ("/v1/models", _chat(), 405),
    "lone surrogate": ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "\ud800"}]), 400),
    "unparsable body": ("/v1/completions", b"\xff\xfe not json", 400),
}


@pytest.mark.parametrize("case", CLIENT_MISTAKES, ids=list(CLIENT_MISTAKES))
def test_client_mistakes_get_their_status_and_an_openai_error_body(server: Server, case: str) -> None:
    path, body, status = CLIENT_MISTAKES[case]
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]  # OpenAI's shape, whoever refused: the gateway, FastAPI or vLLM
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    assert "TextEncodeInput" not in error["message"]  # never a tokenizer's internals
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_public_answers_never_show_server_paths(client: openai.OpenAI, server: Server) -> None:
    """The model list, the answering-checkpoint header and the metrics name checkpoints by their path
    under the root; only /admin/models shows where they are."""
    user = {"Authorization": f"Bearer {API_KEY}"}
    models = httpx.get(f"{server.url}/v1/models", headers=user, timeout=30).text
    raw = client.chat.completions.with_raw_response.create(model="bytes", messages=CHAT, max_tokens=2)
    metrics = httpx.get(f"{server.url}/metrics", headers=user, timeout=30)
    assert metrics.status_code == 200
    for public in (models, json.dumps(dict(raw.headers)), metrics.text):
        assert str(server.root) not in public and "last_error" not in public
    assert raw.headers["x-lape-awq-checkpoint"] == server.label("bytes")
    assert str(server.root) in _admin(server, "GET", "/models").text


@pytest.mark.parametrize("path", ["/metrics", "/openapi.json"])
def test_ops_routes_need_a_key_when_the_server_has_one(server: Server, path: str) -> None:
    assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200  # load balancers need no key


def test_admin_loads_only_from_the_checkpoint_roots(server: Server, tmp_path: Path) -> None:
    """Refused with 403 before anything starts, after resolving `..` and symlinks; the message names the
    roots and the option that adds one."""
    outside = tmp_path / "elsewhere"
    shutil.copytree(server.checkpoints["bytes"], outside)
    link = server.root / "link-to-elsewhere"
    link.symlink_to(outside)
    try:
        for path in (outside, link, server.root / ".." / tmp_path.name / "elsewhere"):
            response = _admin(server, "POST", "/models", {"name": "sneaky", "checkpoint": str(path)})
            assert response.status_code == 403, response.text
            assert "outside the checkpoint roots" in response.json()["error"]["message"]
            assert "--checkpoint-root" in response.json()["error"]["message"]
            swap = _admin(server, "POST", "/models/bytes/swap", {"checkpoint": str(path)})
            assert swap.status_code == 403
    finally:
        link.unlink()
    assert "sneaky" not in {row["id"] for row in _admin(server, "GET", "/models").json()["data"]}


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"kv_cache_gib": 1000}, "memory"),
        ({"max_model_len": 10_000_000}, "context"),
        ({"tensor_parallel_size": 4096}, "tensor_parallel_size"),
    ],
)
def test_engine_options_the_machine_cannot_honour_are_refused(server: Server, options, reason) -> None:
    """400 with the reason, before an engine starts; the name keeps serving its checkpoint."""
    started = time.time()
    body = {"checkpoint": str(server.checkpoints["bytes"]), "options": options}
    response = _admin(server, "POST", "/models/bytes/swap", body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]["message"]
    assert time.time() - started < 10  # refused up front, no engine was started
    assert _admin(server, "POST", "/models", {"name": "absurd", **body}).status_code == 400
    states = {row["id"]: row["state"] for row in _admin(server, "GET", "/models").json()["data"]}
    assert states["bytes"] == "ready" and "absurd" not in states


def test_unknown_model_through_the_sdk_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert "gpt-4o" in raised.value.message


@pytest.fixture(scope="module")
def api_schema(server: Server):
    """The server's own OpenAPI document (vLLM's request models), public routes only."""
    document = f"{server.url}/openapi.json"
    headers = {"Authorization": f"Bearer {API_KEY}"}  # the document needs the key like the API it describes
    return schemathesis.openapi.from_url(document, headers=headers).include(path_regex=r"^/(v1/|health)")


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_schema_fuzz_never_gets_a_5xx(case, server: Server) -> None:
    """Schema-valid and schema-violating requests alike: a client can cause a 4xx, never a 5xx."""
    response = case.call(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
    assert response.status_code < 500, (
        f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:800]}"
    )


# --- metrics, disconnects --------------------------------------------------------------------------


def test_metrics_count_exact_tokens_and_observe_ttft(client: openai.OpenAI, server: Server) -> None:
    before = {
        "tokens": metric(server, "lape_awq_generation_tokens_total", model="bytes"),
        "ttft": metric(server, "lape_awq_time_to_first_token_seconds_count", model="bytes"),
        "requests": metric(server, "lape_awq_requests_total", model="bytes", status="200"),
    }
    for stream in (False, True):
        request = dict(model="bytes", messages=CHAT, max_tokens=9, temperature=0)
        reply = client.chat.completions.create(**request, stream=stream)
        if stream:
            list(reply)
    assert metric(server, "lape_awq_generation_tokens_total", model="bytes") - before["tokens"] == 18
    assert metric(server, "lape_awq_time_to_first_token_seconds_count", model="bytes") - before["ttft"] == 2
    assert metric(server, "lape_awq_requests_total", model="bytes", status="200") - before["requests"] == 2


def test_a_client_that_disconnects_mid_stream_frees_its_engine_request(server: Server) -> None:
    cancelled = metric(server, "lape_awq_cancelled_requests_total", model="korean-chat")
    body = {"model": "korean-chat", "messages": CHAT, "max_tokens": 480, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        lines = response.iter_lines()  # kept: a dropped iterator would close the connection at once
        for line in lines:
            if line.startswith("data:") and '"content"' in line:
                break
        assert metric(server, "lape_awq_engine_unfinished_requests", model="korean-chat") == 1
    deadline = time.time() + 30
    while time.time() < deadline and metric(
        server, "lape_awq_engine_unfinished_requests", model="korean-chat"
    ):
        time.sleep(0.2)
    assert metric(server, "lape_awq_engine_unfinished_requests", model="korean-chat") == 0
    assert metric(server, "lape_awq_cancelled_requests_total", model="korean-chat") == cancelled + 1
    generated = metric(server, "lape_awq_generation_tokens_total", model="korean-chat")
    assert generated < 10_000  # sanity: the counter exists and the request did not run to 480 tokens alone


def test_a_client_that_stops_reading_loses_its_stream_not_its_slot(
    client: openai.OpenAI, server: Server
) -> None:
    """A client that sends a request and never reads: once the socket buffers are full (some MB; 16
    choices with 20 logprobs per token make ~10 MB), the server waits --send-timeout, then cancels the
    request, returns its lease and frees its engine request, while other clients are served throughout."""
    stalled = metric(server, "lape_awq_stalled_clients_total", model="bytes")
    cancelled = metric(server, "lape_awq_cancelled_requests_total", model="bytes")
    body = json.dumps(
        {
            "model": "bytes",
            "messages": CHAT,
            "max_tokens": MAX_MODEL_LEN - 64,
            "n": 16,
            "temperature": 1.0,
            "logprobs": True,
            "top_logprobs": 20,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    port = int(server.url.rsplit(":", 1)[1])
    with socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        reader.connect(("127.0.0.1", port))
        reader.sendall(head + body)  # ... and never a recv
        deadline = time.time() + 240
        while (
            time.time() < deadline
            and metric(server, "lape_awq_stalled_clients_total", model="bytes") == stalled
        ):
            reply = client.chat.completions.create(model="bytes", messages=CHAT, max_tokens=3, temperature=0)
            assert reply.choices[0].message.content == "한"  # others are served meanwhile
            time.sleep(1)
        assert metric(server, "lape_awq_stalled_clients_total", model="bytes") == stalled + 1, (
            server.log_tail()
        )
        assert metric(server, "lape_awq_cancelled_requests_total", model="bytes") == cancelled + 1
        deadline = time.time() + 30
        while time.time() < deadline and (
            metric(server, "lape_awq_in_flight_requests", model="bytes")
            or metric(server, "lape_awq_engine_unfinished_requests", model="bytes")
        ):
            time.sleep(0.2)
        assert metric(server, "lape_awq_in_flight_requests", model="bytes") == 0  # the lease is back
        assert metric(server, "lape_awq_engine_unfinished_requests", model="bytes") == 0


# --- admin: load, failed swap, hot swap under load ----------------------------------------------------


def _admin(server: Server, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(
        method,
        f"{server.url}/admin{path}",
        json=body,
        timeout=600,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )


def test_a_failed_swap_keeps_the_old_checkpoint_serving(client, server) -> None:
    broken = server.root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text("{not json")
    response = _admin(server, "POST", "/models/korean-chat/swap", {"checkpoint": str(broken)})
    assert response.status_code == 422
    assert "previous checkpoint keeps serving" in response.json()["error"]["message"]
    assert client.models.retrieve("korean-chat").model_dump()["state"] == "ready"
    row = next(r for r in _admin(server, "GET", "/models").json()["data"] if r["id"] == "korean-chat")
    assert row["state"] == "ready" and row["checkpoint_path"] == str(server.checkpoints["awq"].resolve())
    assert "unreadable" in row["last_error"]
    body = {"checkpoint": str(broken), "options": {"dtype": 3}}
    bad_options = _admin(server, "POST", "/models/korean-chat/swap", body)
    assert bad_options.status_code == 400
    assert _admin(server, "POST", "/models/nobody/swap", {"checkpoint": str(broken)}).status_code == 404


def test_load_reports_loading_then_serves_then_unloads(client: openai.OpenAI, server: Server) -> None:
    result: dict = {}
    body = {"name": "extra", "checkpoint": str(server.checkpoints["bytes"])}
    loader = threading.Thread(target=lambda: result.update(response=_admin(server, "POST", "/models", body)))
    loader.start()
    deadline = time.time() + 30
    while "extra" not in {m.id for m in client.models.list().data} and time.time() < deadline:
        time.sleep(0.1)
    assert client.models.retrieve("extra").model_dump()["state"] == "loading"
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="extra", messages=CHAT, max_tokens=2)
    assert raised.value.status_code == 503
    loader.join(600)
    assert result["response"].status_code == 200, result["response"].text
    assert result["response"].json()["state"] == "ready"
    reply = client.chat.completions.create(model="extra", messages=CHAT, max_tokens=3, temperature=0)
    assert reply.choices[0].message.content == "한"
    again = {"name": "extra", "checkpoint": str(server.checkpoints["awq"])}
    assert _admin(server, "POST", "/models", again).status_code == 409
    assert _admin(server, "DELETE", "/models/extra").status_code == 200
    assert "extra" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="extra", messages=CHAT, max_tokens=2)


def test_the_pairwise_judge_runs_against_a_model_behind_this_server(server: Server, tokenizer) -> None:
    """`eval`'s judge with a real model as judge: AWQ-opt vs AWQ answered by our torch reference, judged by
    a model answering "[[A]]" served here. A judge that always prefers position A makes every asked pair
    a tie (MT-Bench's both-orders rule)."""
    from lape_awq.quant.checkpoint.torch_reference import load_quantized_model
    from lape_awq.quant.evaluation.judge.client import JudgeClient
    from lape_awq.quant.evaluation.judge.pairwise import run_judge
    from lape_awq.quant.evaluation.judge.questions import load_questions

    judge_dir = write_verdict_judge(server.root / "judge", tokenizer)
    body = {"name": "judge", "checkpoint": str(judge_dir), "options": {"max_model_len": 4096}}
    assert _admin(server, "POST", "/models", body).status_code == 200
    try:
        models = {name: load_quantized_model(server.checkpoints[name]) for name in ("awq", "awq-opt")}
        judge = JudgeClient.connect(f"{server.url}/v1", API_KEY, "judge")
        questions = load_questions()[0][:4]
        result = run_judge(judge, models, tokenizer, questions, max_new_tokens=6, parallel=2, progress=False)
    finally:
        _admin(server, "DELETE", "/models/judge")
    asked = [j for j in result.judgments if j.asked]
    assert asked, "the two checkpoints answered every question identically"
    assert all(j.replies == ("[[A]]", "[[A]]") and j.verdicts == ("A", "A") for j in asked)
    assert result.counts(("awq-opt", "awq")) == {"win": 0, "tie": 4, "loss": 0, "error": 0}


def _kill_engine_processes(pids: list[int]) -> None:
    """SIGKILL an engine's processes and their children (vLLM's workers), as the OOM killer would."""
    import psutil

    victims = [psutil.Process(pid) for pid in pids]
    victims += [child for victim in victims for child in victim.children(recursive=True)]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)


def test_a_dead_engine_fails_fast_other_names_serve_and_an_admin_reloads_it(
    client: openai.OpenAI, server: Server
) -> None:
    """kill -9 of one engine's processes: its stream in flight ends instead of hanging, its new requests get
    503 at once, /health, the model list and a metric say it is dead, other names keep serving, and a swap
    with no checkpoint (a reload) brings it back without restarting the server."""
    load = _admin(
        server, "POST", "/models", {"name": "doomed", "checkpoint": str(server.checkpoints["bytes"])}
    )
    assert load.status_code == 200, load.text
    try:
        deaths = metric(server, "lape_awq_engine_deaths_total", model="doomed")
        pids = next(r["pids"] for r in _admin(server, "GET", "/models").json()["data"] if r["id"] == "doomed")
        streaming, ended = threading.Event(), threading.Event()

        def stream() -> None:
            body = {"model": "doomed", "messages": CHAT, "max_tokens": MAX_MODEL_LEN - 64, "stream": True}
            headers = {"Authorization": f"Bearer {API_KEY}"}
            try:
                with httpx.stream(
                    "POST",
                    f"{server.url}/v1/chat/completions",
                    json=body | {"ignore_eos": True},
                    headers=headers,
                    timeout=120,
                ) as response:
                    for line in response.iter_lines():
                        if '"content"' in line:
                            streaming.set()
            except httpx.HTTPError:
                pass  # a connection cut short is an ending too
            ended.set()

        threading.Thread(target=stream, daemon=True).start()
        assert streaming.wait(60)
        _kill_engine_processes(pids)
        assert ended.wait(60), "the stream in flight hangs after its engine died"
        deadline = time.time() + 30
        while time.time() < deadline and client.models.retrieve("doomed").model_dump()["state"] != "dead":
            time.sleep(0.2)
        started = time.time()
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model="doomed", messages=CHAT, max_tokens=2)
        assert raised.value.status_code == 503 and time.time() - started < 5
        assert "died" in raised.value.message and "/admin/models/doomed/swap" in raised.value.message
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["models"]["doomed"] == "dead"
        assert health.json()["models"]["bytes"] == "ready"
        reply = client.chat.completions.create(model="bytes", messages=CHAT, max_tokens=3, temperature=0)
        assert reply.choices[0].message.content == "한"
        deadline = time.time() + 10
        while (
            time.time() < deadline
            and metric(server, "lape_awq_engine_deaths_total", model="doomed") == deaths
        ):
            time.sleep(0.2)
        assert metric(server, "lape_awq_engine_deaths_total", model="doomed") == deaths + 1
        reload = _admin(server, "POST", "/models/doomed/swap", {})
        assert reload.status_code == 200 and reload.json()["state"] == "ready", reload.text
        reply = client.chat.completions.create(model="doomed", messages=CHAT, max_tokens=3, temperature=0)
        assert reply.choices[0].message.content == "한"
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    finally:
        _admin(server, "DELETE", "/models/doomed")


def _first_token_logprob(client: openai.OpenAI, model: str) -> tuple[float, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=1, temperature=0, logprobs=True
    )
    return raw.parse().choices[0].logprobs.content[0].logprob, raw.headers["x-lape-awq-checkpoint"]


def test_hot_swap_under_load_drops_no_request(client: openai.OpenAI, server: Server) -> None:
    """16 streaming clients run throughout while korean-chat goes AWQ -> AWQ-opt -> AWQ."""
    awq, opt = (server.label(k) for k in ("awq", "awq-opt"))
    paths = {server.label(k): str(server.checkpoints[k]) for k in ("awq", "awq-opt")}
    reference = {
        awq: _first_token_logprob(client, "korean-chat")[0],
        opt: _first_token_logprob(client, "tiny-opt")[0],
    }
    assert abs(reference[awq] - reference[opt]) > 1e-3  # the two checkpoints are distinguishable
    stop = threading.Event()
    results: list[tuple[str, str | None, int]] = []  # (checkpoint that answered, error, missing tokens)
    lock = threading.Lock()

    def stream_forever(worker: int) -> None:
        own = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
        while not stop.is_set():
            try:
                wanted = 8 + worker % 5
                raw = own.chat.completions.with_raw_response.create(
                    model="korean-chat",
                    messages=CHAT,
                    max_tokens=wanted,
                    temperature=0.7,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                usage = [c.usage for c in raw.parse() if c.usage is not None]
                outcome = (raw.headers["x-lape-awq-checkpoint"], None, wanted - usage[-1].completion_tokens)
            except Exception as error:  # every failure is a test failure, reported below
                outcome = ("", repr(error), 0)
            with lock:
                results.append(outcome)

    workers = [threading.Thread(target=stream_forever, args=(i,)) for i in range(16)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(3)
        for target in (opt, awq):
            response = _admin(server, "POST", "/models/korean-chat/swap", {"checkpoint": paths[target]})
            assert response.status_code == 200, response.text
            assert response.json()["checkpoint"] == target
            logprob, answered_by = _first_token_logprob(client, "korean-chat")
            assert answered_by == target
            assert abs(logprob - reference[target]) < abs(reference[awq] - reference[opt]) / 2
            time.sleep(2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(300)
    errors = [error for _, error, _ in results if error]
    assert not errors, errors[:3]
    served = {checkpoint for checkpoint, _, _ in results}
    assert served == {awq, opt}
    assert len(results) >= 32 and all(missing == 0 for _, _, missing in results)
    deadline = time.time() + 60  # the replaced engines stop once drained
    while _admin(server, "GET", "/models").json()["draining"] and time.time() < deadline:
        time.sleep(0.5)
    assert _admin(server, "GET", "/models").json()["draining"] == []


def test_the_demo_client_streams_times_and_prints_answers_side_by_side(server: Server) -> None:
    """`lape-awq demo`'s client half against this server: the byte-cycle model's Korean comes whole with its
    checkpoint and timings, and the side-by-side print keeps every line within the terminal's columns
    (Hangul counted as two) with the separator in one column."""
    from lape_awq.server.demo_command import ask, display_width, side_by_side

    own = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    answer = ask(own, "bytes", CHAT[0]["content"], 9)
    assert answer.text == CYCLE_TEXT and answer.tokens == 9  # three syllables of three byte tokens each
    assert answer.checkpoint == server.label("bytes")
    assert answer.ttft_s is not None and answer.ttft_s > 0 and answer.decode_tok_s is not None
    assert "TTFT" in answer.meta() and "9 tokens" in answer.meta()
    blocks = [[answer.text * 5, answer.meta()], ["a" * 90, "", "끝"]]
    lines = side_by_side(["bytes", "other"], blocks, 61).splitlines()
    assert all(display_width(line) <= 61 for line in lines)
    separators = {display_width(line.split(" | ")[0]) for line in lines if " | " in line}
    assert separators == {29}
    assert "".join(line.split(" | ")[0].strip() for line in lines[2:]).startswith(answer.text * 5)


# --- the chat page, in a real browser --------------------------------------------------------------------
# Headless Chromium (tests/browser.py) on the page this server serves at /, talking to it only through the
# public routes. These run last: the admin swap below changes what korean-chat serves.

PAGE_WAIT_S = 300


@pytest.fixture(scope="module")
def page(server: Server) -> Iterator:
    with chromium() as driver:
        yield driver


def _open_page(driver, server: Server, key: str) -> None:
    """A fresh page with `key` typed into the API key field (its change event lists the models)."""
    driver.get(f"{server.url}/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "api-key").is_displayed())
    field = driver.find_element(By.ID, "api-key")
    field.send_keys(key, Keys.TAB)


def _set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _answers(driver, pane: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, f"#{pane} .message.assistant")


def _send_and_wait(driver, prompt: str, turns: int, panes: tuple[str, ...]) -> None:
    """Send `prompt`; wait until each pane's `turns`-th answer has finished (done or error)."""
    _set_field(driver, "prompt", prompt)
    driver.find_element(By.ID, "send").click()

    def finished(d) -> bool:
        return all(
            len(_answers(d, p)) >= turns
            and _answers(d, p)[turns - 1].get_attribute("data-state") != "streaming"
            for p in panes
        )

    WebDriverWait(driver, PAGE_WAIT_S).until(finished)


def _text(element) -> str:
    return element.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")


def test_chat_page_streams_one_prompt_to_two_models_side_by_side(
    page, server: Server, client: openai.OpenAI, tmp_path: Path
) -> None:
    """Two turns to tiny-opt (left) and the byte-cycle model (right), greedy: each pane's text is the
    non-streaming API's answer to the same conversation, Korean split across byte tokens arrives whole,
    each answer names its checkpoint, and the page logs no console error."""
    _open_page(page, server, API_KEY)
    WebDriverWait(page, 30).until(lambda d: len(Select(d.find_element(By.ID, "model-a")).options) == 3)
    Select(page.find_element(By.ID, "model-a")).select_by_value("tiny-opt")
    Select(page.find_element(By.ID, "model-b")).select_by_value("bytes")
    _set_field(page, "temperature", "0")
    _set_field(page, "max-tokens", "9")
    history: dict[str, list[dict]] = {"tiny-opt": [], "bytes": []}
    for turn, prompt in enumerate((CHAT[0]["content"], "고마워요. 한 번 더요."), 1):
        _send_and_wait(page, prompt, turn, ("pane-a", "pane-b"))
        for pane, model in (("pane-a", "tiny-opt"), ("pane-b", "bytes")):
            answer = _answers(page, pane)[turn - 1]
            assert answer.get_attribute("data-state") == "done", _text(answer)
            history[model].append({"role": "user", "content": prompt})
            expected = client.chat.completions.create(
                model=model, messages=history[model], max_tokens=9, temperature=0
            )
            shown = _text(answer)
            assert shown == expected.choices[0].message.content
            assert "\ufffd" not in shown
            history[model].append({"role": "assistant", "content": shown})
            served_from = client.models.retrieve(model).model_dump()["checkpoint"]
            assert answer.get_attribute("data-checkpoint") == served_from
            meta = answer.find_element(By.CSS_SELECTOR, ".meta").text
            assert "TTFT" in meta and "9 tokens" in meta and served_from in meta
    assert _text(_answers(page, "pane-b")[0]) == CYCLE_TEXT  # 9 byte tokens
    assert console_errors(page) == []
    page.save_screenshot(str(tmp_path / "desktop.png"))
    # Phone width: the panes stack, nothing runs off the side.
    page.set_window_size(390, 844)
    left, right = (page.find_element(By.ID, p).rect for p in ("pane-a", "pane-b"))
    assert right["y"] >= left["y"] + left["height"]
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    page.save_screenshot(str(tmp_path / "phone.png"))
    page.set_window_size(1280, 900)


def test_chat_page_shows_a_wrong_key_as_a_readable_401(page, server: Server) -> None:
    _open_page(page, server, "not-the-key")
    status = page.find_element(By.ID, "status")
    WebDriverWait(page, 30).until(lambda _: "401" in status.text)
    assert "Incorrect or missing API key" in status.text
    assert "error" in status.get_attribute("class")


def test_chat_page_admin_swap_changes_the_answering_checkpoint(page, server: Server) -> None:
    """Through the page's admin section: a refused swap shows the server's reason and changes nothing; a
    good one makes the next answer come from the new checkpoint."""
    _open_page(page, server, API_KEY)
    page.find_element(By.CSS_SELECTOR, "#admin summary").click()
    _set_field(page, "admin-key", ADMIN_KEY)
    page.find_element(By.ID, "admin-refresh").click()
    status = page.find_element(By.ID, "admin-status")
    WebDriverWait(page, 30).until(lambda _: "served" in status.text)
    assert "korean-chat" in page.find_element(By.ID, "admin-models").text
    current = _admin(server, "GET", "/models").json()["data"]
    before = next(row["checkpoint"] for row in current if row["id"] == "korean-chat")
    target = next(k for k in ("awq", "awq-opt") if server.label(k) != before)

    _set_field(page, "admin-name", "korean-chat")
    _set_field(page, "admin-checkpoint", str(server.root / "missing"))
    page.find_element(By.ID, "admin-swap").click()
    WebDriverWait(page, 60).until(lambda _: "422" in status.text)
    assert "previous checkpoint keeps serving" in status.text

    _set_field(page, "admin-checkpoint", str(server.checkpoints[target]))
    page.find_element(By.ID, "admin-swap").click()
    WebDriverWait(page, PAGE_WAIT_S).until(lambda _: "swap done" in status.text)
    WebDriverWait(page, 30).until(
        lambda d: (
            "korean-chat"
            in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "model-a")).options]
        )
    )
    Select(page.find_element(By.ID, "model-a")).select_by_value("korean-chat")
    Select(page.find_element(By.ID, "model-b")).select_by_value("")
    _set_field(page, "max-tokens", "2")
    _send_and_wait(page, CHAT[0]["content"], 1, ("pane-a",))
    answer = _answers(page, "pane-a")[0]
    assert answer.get_attribute("data-state") == "done", _text(answer)
    assert answer.get_attribute("data-checkpoint") == server.label(target)
    assert not page.find_element(By.ID, "pane-b").is_displayed()
