"""The judge: any OpenAI-compatible chat endpoint, checked before any model runs, with its network and
HTTP errors turned into one clear line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lape_awq.quant.errors import UserError

JUDGE_REPLY_TOKENS = 2048  # MT-Bench's judge budget: an explanation, then the verdict
JUDGE_TIMEOUT_S = 300.0
KEY_ENV = "LAPE_AWQ_JUDGE_KEY"


def _cause(exc: BaseException) -> str:
    """The underlying reason of a connection error ("Connection error." alone says little)."""
    inner = exc.__cause__ or exc.__context__
    text = str(inner or exc).strip() or type(inner or exc).__name__
    return text.splitlines()[0]


def _detail(exc: Any) -> str:
    """The server's own words from an error body: OpenAI's {"error": {"message"}} or FastAPI's {"detail"}."""
    body = exc.body
    if isinstance(body, dict):
        body = body.get("error", body)
    if isinstance(body, dict):
        body = body.get("message") or body.get("detail")
    text = " ".join(str(body or "").split())
    return f" ({text[:200]})" if text else ""


@contextmanager
def _judge_errors(url: str) -> Iterator[None]:
    """Turn the SDK's network and HTTP errors into one UserError naming the judge's URL."""
    import openai

    try:
        yield
    except openai.APITimeoutError as exc:
        raise UserError(f"the judge at {url} did not answer within {JUDGE_TIMEOUT_S:.0f} s") from exc
    except openai.APIConnectionError as exc:
        raise UserError(f"cannot reach the judge at {url}: {_cause(exc)}") from exc
    except openai.APIStatusError as exc:
        hint = {
            401: f": check --judge-key (or ${KEY_ENV})",
            403: f": check --judge-key (or ${KEY_ENV})",
            404: " (is the URL the API root, usually ending in /v1, and --judge-model served there?)",
        }.get(exc.status_code, "")
        raise UserError(f"the judge at {url} answered HTTP {exc.status_code}{_detail(exc)}{hint}") from exc
    except openai.OpenAIError as exc:
        raise UserError(f"the judge at {url} failed: {_cause(exc)}") from exc


@dataclass
class JudgeClient:
    """An OpenAI-compatible chat endpoint and the model that judges."""

    url: str
    model: str
    client: Any = field(repr=False)

    @classmethod
    def connect(cls, url: str, key: str, model: str | None = None) -> JudgeClient:
        """Check the endpoint answers (before any model is run) and pick its first model if none given."""
        try:
            import openai
        except ImportError as exc:
            raise UserError("the judge needs the openai package: pip install openai") from exc
        client = openai.OpenAI(base_url=url, api_key=key, timeout=JUDGE_TIMEOUT_S, max_retries=2)
        with _judge_errors(url):
            try:
                listed = [m.id for m in client.models.list().data]
            except openai.APIStatusError as exc:
                # Some endpoints have no /models; with a named model that is no reason to stop.
                if model is None or exc.status_code in (401, 403):
                    raise
                listed = []
        if model is None:
            if not listed:
                raise UserError(f"the judge at {url} lists no models: name one with --judge-model")
            model = listed[0]
        elif listed and model not in listed:
            print(
                f"lape-awq: warning: the judge at {url} does not list {model!r} "
                f"(it lists {', '.join(listed[:5])}); trying it anyway",
                file=sys.stderr,
            )
        return cls(url, model, client)

    def ask(self, messages: list[dict[str, str]]) -> str:
        """The judge's reply (temperature 0); empty when it returns no text."""
        with _judge_errors(self.url):
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=JUDGE_REPLY_TOKENS
            )
        choices = getattr(response, "choices", None) or []
        return (choices[0].message.content or "") if choices else ""
