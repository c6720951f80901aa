"""A stand-in for llama.cpp's `llama-server` in tests: a tiny OpenAI-compatible chat server on the flags the
serving benchmark passes (bench/peers.py). It streams `max_tokens` Korean words, one chunk each, then the
usage chunk; it answers 404 for a model name other than its --alias, and writes its argv next to the GGUF
(`<model>.argv.json`) so a test can check how it was started. Its `/completion` route answers llama.cpp's
top log-probabilities (`n_probs`) of `fake_logits` over a VOCAB-token vocabulary."""

from __future__ import annotations

import argparse
import json
import math
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WORD = "안녕 "
VOCAB = 64


def fake_logits(prompt: list[int]) -> list[float]:
    """The next-token logits this stand-in model gives after `prompt`."""
    return [3.0 * math.cos(token + 0.37 * sum(prompt)) for token in range(VOCAB)]


def top_logprobs(prompt: list[int], n: int) -> list[dict]:
    logits = fake_logits(prompt)
    log_total = math.log(sum(math.exp(z) for z in logits))
    ranked = sorted(range(VOCAB), key=lambda t: -logits[t])[:n]
    return [{"id": t, "token": f"<{t}>", "logprob": logits[t] - log_total} for t in ranked]


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--alias", "--host", "--port", "--threads", "--threads-batch", "--parallel"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--ctx-size", required=True)
    parser.add_argument("--cont-batching", action="store_true")
    args = parser.parse_args()
    model = Path(args.model)
    if not model.is_file():
        raise SystemExit(f"error: failed to load model {model}")
    model.with_name(model.name + ".argv.json").write_text(json.dumps(vars(args)))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args) -> None:
            pass

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._json(404, {"error": {"message": "not found", "code": 404}})

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/completion":
                prompt, n = request["prompt"], int(request.get("n_probs", 0))
                probs = [{"id": 0, "token": "<0>", "top_logprobs": top_logprobs(prompt, n)}]
                self._json(200, {"tokens_evaluated": len(prompt), "completion_probabilities": probs})
                return
            if self.path != "/v1/chat/completions" or request.get("model") != args.alias:
                self._json(404, {"error": {"message": f"model {request.get('model')!r} not found"}})
                return
            tokens = int(request.get("max_tokens", 16))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()

            def send(chunk: dict) -> None:
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()

            base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": args.alias}
            for _ in range(tokens):
                time.sleep(0.002)
                send({**base, "choices": [{"index": 0, "delta": {"content": WORD}, "finish_reason": None}]})
            send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
            send({**base, "choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    ThreadingHTTPServer((args.host, int(args.port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
