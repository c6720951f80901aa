"""`lape-awq demo`: the product end to end on the default model.

Prepares the default model, finds its Korean neurons and builds its AWQ and AWQ-opt checkpoints (each
step reuses what an earlier run left), starts `lape-awq serve` with both on loopback, asks both the same
Korean questions through the `openai` SDK (streaming, greedy, one model at a time so each one's tokens/s
is its own), prints the answers side by side with TTFT, tokens/s and the checkpoint that answered, then
stops the server, or with --keep-serving leaves it running (chat page at /) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lape_awq.quant.errors import UserError
from lape_awq.server.serve_process import ServeProcess

QUESTIONS = (
    "서울을 두세 문장으로 소개해 주세요.",
    "비 오는 날 먹기 좋은 한국 음식을 추천해 주세요.",
    "한국어를 처음 배우는 사람에게 조언 한 가지를 해 주세요.",
)
START_TIMEOUT_S = 900


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="the main job end to end: build both default checkpoints, serve them, ask both in Korean",
        description="Prepare the default model, find its Korean neurons, build its AWQ and AWQ-opt "
        "checkpoints (reusing earlier ones), serve both with `lape-awq serve` on loopback, ask both the same "
        "Korean questions through the OpenAI API and print the answers side by side, then stop the server.",
    )
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per answer")
    parser.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the server running after the answers (Ctrl-C stops)",
    )
    parser.add_argument("--plot", type=Path, help="also write the Korean neurons' heat-map to this PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bars while building")
    parser.set_defaults(run=_run_demo)


@dataclass
class Answer:
    """One streamed answer and how it came."""

    text: str
    ttft_s: float | None
    tokens: int | None
    decode_tok_s: float | None
    checkpoint: str

    def meta(self) -> str:
        parts = [] if self.ttft_s is None else [f"TTFT {self.ttft_s:.2f} s"]
        if self.decode_tok_s is not None:
            parts.append(f"{self.decode_tok_s:.1f} tok/s")
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens")
        return " · ".join(parts)


class Stages:
    """One progress line per stage, with its time; the times are summed up at the end."""

    def __init__(self, total: int):
        self.total, self.done, self.times = total, 0, []

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        self.done += 1
        print(f"demo [{self.done}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.times.append((what, seconds))
        print(f"demo [{self.done}/{self.total}] {what}: {seconds:.0f} s", file=sys.stderr, flush=True)

    def summary(self) -> str:
        lines = [f"  {seconds:6.0f} s  {what}" for what, seconds in self.times]
        return "\n".join(["stage times:", *lines, f"  {sum(s for _, s in self.times):6.0f} s  total"])


def checkpoint_line(path: Path) -> str:
    """Size and what is kept in FP16, from the checkpoint's manifest."""
    from lape_awq.quant.checkpoint.layout import MANIFEST

    manifest = json.loads((path / MANIFEST).read_text())
    sizes, vocab = manifest["sizes"], manifest.get("vocab_spec") or {}
    parts = [f"{sizes['total_bytes'] / 2**20:.1f} MiB"]
    if vocab.get("bits", 16) != 16:
        langs, kept_mib = "/".join(vocab.get("keep_langs", ())), sizes.get("kept_rows_bytes", 0) / 2**20
        kept = f", {kept_mib:.1f} MiB of {langs} rows in FP16" if langs else ""
        parts.append(f"{vocab['bits']}-bit vocabulary{kept}")
    if sizes.get("sparse_bytes"):
        parts.append(f"{sizes['sparse_bytes'] / 2**10:.0f} KiB of Korean FFN neurons in FP16")
    return f"{'; '.join(parts)} ({path})"


def ask(client: object, model: str, question: str, max_tokens: int) -> Answer:
    """One greedy streamed chat answer, timed as a client sees it."""
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(  # type: ignore[attr-defined]
        model=model,
        messages=[{"role": "user", "content": question}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=max_tokens,
        temperature=0.0,
    )
    checkpoint = raw.headers.get("x-lape-awq-checkpoint", "?")
    pieces, first, tokens = [], None, None
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    ended = time.perf_counter()
    decode = None
    if first is not None and tokens is not None and tokens > 1 and ended > first:
        decode = (tokens - 1) / (ended - first)
    ttft = None if first is None else first - started
    return Answer("".join(pieces).strip(), ttft, tokens, decode, checkpoint)


def display_width(text: str) -> int:
    """Terminal columns: Hangul and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def wrap(text: str, columns: int) -> list[str]:
    """`text` in lines of at most `columns` terminal columns (wide characters counted as two), broken at
    the last space of a line where it has one (Korean separates words with spaces too)."""
    lines = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for char in paragraph:
            if display_width(line + char) > columns:
                cut = line.rfind(" ") if char != " " else -1
                # A cut after the line's first character frees at least two columns: the rest fits.
                lines.append(line[:cut] if cut > 0 else line)
                line = line[cut + 1 :] if cut > 0 else ""
                if char == " " and not line:
                    continue
            line += char
        lines.append(line)
    return lines


def side_by_side(titles: list[str], blocks: list[list[str]], columns: int) -> str:
    """Two columns of text, padded by display width."""
    left_w = (columns - 3) // 2
    left = [*wrap(titles[0], left_w), "-" * left_w, *[x for b in blocks[0] for x in wrap(b, left_w)]]
    right = [*wrap(titles[1], left_w), "-" * left_w, *[x for b in blocks[1] for x in wrap(b, left_w)]]
    rows = []
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        rows.append(f"{a}{' ' * (left_w - display_width(a))} | {b}".rstrip())
    return "\n".join(rows)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run_demo(args: argparse.Namespace) -> None:
    import openai

    from lape_awq.quant.awq.default_checkpoints import (
        DEFAULT_METHODS,
        ensure_default_checkpoints,
        ensure_neurons_file,
    )
    from lape_awq.quant.default_model import DEFAULT_MODEL_NAME, prepare_default_model
    from lape_awq.quant.lape.neurons_file import NeuronsFile
    from lape_awq.quant.lape.report import summary_lines, write_plot
    from lape_awq.quant.paths import home_dir

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    progress = not args.quiet
    stages = Stages(5)
    with stages("default model (Gemma 3 270M, float32)"):
        model_dir = prepare_default_model()
    with stages("Korean neurons (LAPE over 8 languages)"):
        neurons = NeuronsFile.load(ensure_neurons_file(model_dir, progress))
    print("\n".join(summary_lines(neurons, "ko")[:2]), flush=True)
    if args.plot:
        write_plot(neurons, args.plot, "ko")
        print(f"plot: {args.plot}", flush=True)
    # Built together where missing: one model load and calibration, the searches they share run once.
    with stages(f"{' and '.join(m.upper() for m in DEFAULT_METHODS)} checkpoints (default recipe)"):
        paths = ensure_default_checkpoints(DEFAULT_METHODS, progress)
    models = [(f"{DEFAULT_MODEL_NAME}-{method}", path) for method, path in paths.items()]
    for method, path in paths.items():
        print(f"{method}: {checkpoint_line(path)}", flush=True)
    # A closed terminal (SIGHUP) or `kill` (SIGTERM) must stop the server too, as Ctrl-C does: the server
    # runs in its own session (so Ctrl-C reaches only the demo), and without this it would outlive the demo.
    for stop_signal in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _interrupt)
    server = ServeProcess(models, ["--quiet"], home_dir() / "demo" / "server.log", args.port)
    try:
        with stages(f"starting lape-awq serve on {server.root} (log: {server.log})"):
            reason = server.wait_ready(START_TIMEOUT_S)
            if reason is not None:
                raise UserError(f"the server did not start ({reason}); its log: {server.log}")
        client = openai.OpenAI(base_url=f"{server.root}/v1", api_key="EMPTY", max_retries=0, timeout=600)
        columns = max(60, shutil.get_terminal_size((120, 24)).columns)
        with stages(f"asking both checkpoints {len(QUESTIONS)} Korean questions"):
            for number, question in enumerate(QUESTIONS, 1):
                answers = [ask(client, name, question, args.max_tokens) for name, _ in models]
                print(f"\nQ{number}. {question}\n")
                blocks = [[a.text, "", a.meta(), f"checkpoint: {a.checkpoint}"] for a in answers]
                print(side_by_side([name for name, _ in models], blocks, columns), flush=True)
        print(f"\n{stages.summary()}\n", flush=True)
        print(f"Chat page (A/B in the browser): {server.root}/   OpenAI API: {server.root}/v1")
        if args.keep_serving:
            print("Serving until Ctrl-C.", flush=True)
            server.process.wait()
        else:
            print(
                "To keep a server running: `make serve` (or `lape-awq serve`; then open http://127.0.0.1:8000/)."
            )
    finally:
        server.stop()
