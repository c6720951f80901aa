"""The pairwise judge: the Korean question set, verdicts and the both-orders rule, and whole runs against
a real OpenAI-compatible HTTP server on 127.0.0.1 whose "judge" prefers the longer answer."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI, HTTPException, Request

from lape_awq.quant.awq.pipeline import quantize_checkpoint
from lape_awq.quant.awq.quantizer import QuantSpec
from lape_awq.quant.calibration import CalibrationSpec
from lape_awq.quant.cli.main import main
from lape_awq.quant.errors import UserError
from lape_awq.quant.evaluation.judge.answers import prompt_ids
from lape_awq.quant.evaluation.judge.client import KEY_ENV, JudgeClient
from lape_awq.quant.evaluation.judge.pairwise import judge_answers
from lape_awq.quant.evaluation.judge.questions import (
    CATEGORIES,
    Question,
    load_questions,
    parse_questions,
    select_questions,
)
from lape_awq.quant.evaluation.judge.verdicts import (
    SYSTEM_PROMPT,
    SYSTEM_PROMPT_REF,
    combine,
    contender_pairs,
    judge_messages,
    parse_verdict,
    win_rate,
)
from lape_awq.quant.evaluation.scoring import FP_NAME

HANGUL = re.compile("[가-힣]")
KEY = "test-key"
JUDGE_MODEL = "length-judge"
BIASED, BROKEN = "편향", "고장"  # questions holding these get a position-biased / verdict-less judge


# --- the question set -----------------------------------------------------------------------------------


def test_packaged_questions_are_80_korean_questions_10_per_category() -> None:
    questions, source = load_questions()
    assert source == "packaged" and len(questions) == 80
    assert Counter(q.category for q in questions) == dict.fromkeys(CATEGORIES, 10)
    assert [q.category for q in questions[::10]] == list(CATEGORIES)
    assert len({q.id for q in questions}) == 80
    for q in questions:
        assert HANGUL.search(q.question), q.id
        # Math and reasoning carry the right answer for the judge; the open-ended categories do not.
        assert (q.reference is not None) == (q.category in ("math", "reasoning")), q.id
        assert q.reference is None or HANGUL.search(q.reference)


def test_user_question_files_are_checked_line_by_line(tmp_path: Path) -> None:
    good = tmp_path / "q.jsonl"
    good.write_text('{"id": 7, "category": "math", "question": "1+1은?", "reference": "2"}\n\n', "utf-8")
    questions, source = load_questions(good)
    assert questions == [Question("7", "math", "1+1은?", "2")] and source == str(good.resolve())
    cases = {
        '{"id": 1, "category": "math"}': "line 1: 'question' must be a non-empty string",
        '{"id": 1, "category": "math", "question": "a"}\n{"id": "1", "category": "x", "question": "b"}': (
            "line 2: id '1' is used twice"
        ),
        "{not json": "line 1: not valid JSON",
        '["a"]': "line 1: expected a JSON object",
        '{"id": true, "category": "math", "question": "a"}': "'id' must be a non-empty string or an integer",
        "\n": "holds no questions",
    }
    for text, expected in cases.items():
        with pytest.raises(UserError, match=re.escape(expected)):
            parse_questions(text, "q.jsonl")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"id": 1, "category": "é", "question": "é"}'.encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8"):
        load_questions(latin1)
    with pytest.raises(UserError, match="question file not found"):
        load_questions(tmp_path / "none.jsonl")


def test_a_question_limit_stays_balanced_over_the_categories() -> None:
    questions, _ = load_questions()
    eight = select_questions(questions, limit=8)
    assert [q.id for q in eight] == [f"{c}-01" for c in CATEGORIES]
    twenty = select_questions(questions, limit=20)
    counts = Counter(q.category for q in twenty)
    assert [counts[c] for c in CATEGORIES] == [3, 3, 3, 3, 2, 2, 2, 2]
    assert twenty == sorted(twenty, key=questions.index)  # the file's order is kept
    two = select_questions(questions, ["math", "coding"], limit=5)
    assert [q.id for q in two] == ["math-01", "math-02", "math-03", "coding-01", "coding-02"]
    assert select_questions(questions, limit=500) == questions
    with pytest.raises(UserError, match="no questions in category 'poetry'"):
        select_questions(questions, ["poetry"])
    with pytest.raises(UserError, match="--judge-questions must be at least 1"):
        select_questions(questions, limit=0)


# --- verdicts, the both-orders rule, prompts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("Assistant A is more accurate. [[A]]", "A"),
        ("[[B]]", "B"),
        ("동점입니다. [[ C ]]", "C"),
        ('The format is "[[A]]", "[[B]]" or "[[C]]". Final verdict: [[B]]', "B"),  # the last one counts
        ("A is better.", "error"),
        ("[[D]]", "error"),
        ("[A]", "error"),
        ("", "error"),
    ],
)
def test_parse_verdict(reply: str, verdict: str) -> None:
    assert parse_verdict(reply) == verdict


def test_a_win_needs_both_orders_to_agree() -> None:
    # first_as_a: the verdict with the first model as assistant A; first_as_b: after swapping.
    expected = {
        ("A", "B"): "win",
        ("B", "A"): "loss",
        ("C", "C"): "tie",
        ("A", "A"): "tie",
        ("B", "B"): "tie",  # position bias: whoever is shown first wins
        ("A", "C"): "tie",
        ("C", "B"): "tie",
        ("B", "C"): "tie",
        ("C", "A"): "tie",
    }
    for (first_as_a, first_as_b), outcome in expected.items():
        assert combine(first_as_a, first_as_b) == outcome, (first_as_a, first_as_b)
    for verdict in ("A", "B", "C", "error"):
        assert combine("error", verdict) == combine(verdict, "error") == "error"


def test_win_rate_leaves_errors_out() -> None:
    assert win_rate({"win": 3, "tie": 2, "loss": 1, "error": 4}) == pytest.approx(4 / 6)
    assert win_rate({"win": 0, "tie": 0, "loss": 0, "error": 2}) is None
    assert contender_pairs([FP_NAME, "awq", "opt"]) == [("awq", FP_NAME), ("opt", FP_NAME), ("opt", "awq")]


def test_judge_messages_show_the_reference_answer_where_there_is_one() -> None:
    plain = judge_messages(Question("1", "writing", "시를 써 주세요."), "가", "나나")
    assert plain[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert (
        "[User Question]\n시를 써 주세요.\n\n[The Start of Assistant A's Answer]\n가\n" in plain[1]["content"]
    )
    assert (
        "[The Start of Assistant B's Answer]\n나나\n[The End of Assistant B's Answer]" in plain[1]["content"]
    )
    ref = judge_messages(Question("2", "math", "1+1은?", "2입니다."), "2", "3")
    assert ref[0]["content"] == SYSTEM_PROMPT_REF
    assert "[The Start of Reference Answer]\n2입니다.\n[The End of Reference Answer]" in ref[1]["content"]
    for system in (SYSTEM_PROMPT, SYSTEM_PROMPT_REF):
        assert '"[[A]]"' in system and '"[[B]]"' in system and '"[[C]]" for a tie' in system


def test_prompts_use_the_chat_template_when_the_tokenizer_has_one(tokenizer, monkeypatch) -> None:
    ids, plain = prompt_ids(tokenizer, "한국의 수도는?")
    assert plain and tokenizer.decode(ids) == "<bos>질문: 한국의 수도는?\n답변:"
    template = "{{ bos_token }}{% for m in messages %}<turn>{{ m['content'] }}</turn>{% endfor %}<reply>"
    monkeypatch.setattr(tokenizer, "chat_template", template)
    ids, plain = prompt_ids(tokenizer, "한국의 수도는?")
    assert not plain and tokenizer.decode(ids) == "<bos><turn>한국의 수도는?</turn><reply>"


def test_a_base_model_answer_ends_where_it_starts_a_new_question_or_answer(tokenizer) -> None:
    from torch import nn
    from transformers import GenerationConfig

    from lape_awq.quant.evaluation.judge.answers import generate_answer, stop_at_plain_marker

    ids, _ = prompt_ids(tokenizer, "질문")
    said = tokenizer("  서울입니다.\n답변: 서울\n질문: 또", add_special_tokens=False)["input_ids"]
    model = nn.Linear(1, 1)
    model.generation_config = GenerationConfig(eos_token_id=1)
    model.generate = lambda **kwargs: torch.tensor([ids + said])  # what a base model would write
    assert generate_answer(model, tokenizer, "질문", 32) == "서울입니다."
    stop = stop_at_plain_marker(tokenizer, len(ids))
    upto = len(tokenizer("  서울입니다.", add_special_tokens=False)["input_ids"])
    assert not bool(stop(torch.tensor([ids + said[:upto]]), None)[0])
    assert bool(stop(torch.tensor([ids + said]), None)[0])


# --- a real local judge server --------------------------------------------------------------------------


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def length_judge(prompt: str) -> str:
    """Prefers the longer answer (ties on equal length), so expected counts are known; quotes the format
    first, as real judges do, so only the last verdict may count."""
    question = _between(prompt, "[User Question]\n", "\n\n[The Start of")
    a = _between(prompt, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]")
    b = _between(prompt, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]")
    if BROKEN in question:
        return "두 답변 모두 훌륭합니다."
    verdict = "A" if BIASED in question or len(a) > len(b) else "B" if len(b) > len(a) else "C"
    return f"형식은 [[A]], [[B]], [[C]] 중 하나입니다. 더 긴 답변을 골랐습니다. 최종 판정: [[{verdict}]]"


def judge_app(requests: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    def check_key(request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            raise HTTPException(status_code=401, detail="invalid api key")

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        check_key(request)
        names = [JUDGE_MODEL, "another-model"]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "t"} for n in names],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        check_key(request)
        body = await request.json()
        requests.append(body)
        reply = length_judge(body["messages"][-1]["content"])
        message = {"role": "assistant", "content": reply}
        return {
            "id": f"chatcmpl-{len(requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


@dataclass
class JudgeServer:
    url: str
    requests: list[dict[str, Any]]


@pytest.fixture(scope="module")
def judge_server() -> Iterator[JudgeServer]:
    """uvicorn on a free port of 127.0.0.1, in a thread, for the whole module."""
    import uvicorn

    requests: list[dict[str, Any]] = []
    server = uvicorn.Server(
        uvicorn.Config(judge_app(requests), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the judge server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield JudgeServer(f"http://127.0.0.1:{port}/v1", requests)
    server.should_exit = True
    thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_outcome(first: str, second: str) -> str:
    return "win" if len(first) > len(second) else "loss" if len(second) > len(first) else "tie"


def test_judging_over_http_follows_the_rules(judge_server: JudgeServer) -> None:
    judge = JudgeClient.connect(judge_server.url, KEY)
    assert judge.model == JUDGE_MODEL  # the first model the endpoint lists
    questions = [
        Question("long", "writing", "긴 답이 이기는 질문"),
        Question("same", "writing", "같은 답"),
        Question("bias", "math", f"{BIASED}된 판정", "정답"),
        Question("broken", "stem", f"{BROKEN}난 판정"),
    ]
    answers = {
        "x": {"long": "아주 긴 답변입니다", "same": "같다", "bias": "1", "broken": "가"},
        "y": {"long": "짧다", "same": "같다", "bias": "22", "broken": "나"},
    }
    before = len(judge_server.requests)
    judgments = judge_answers(judge, questions, answers, [("x", "y")], parallel=3, progress=False)
    assert [(j.question_id, j.outcome, j.asked) for j in judgments] == [
        ("long", "win", True),
        ("same", "tie", False),  # identical answers: a tie without asking
        ("bias", "tie", True),  # [[A]] in both orders: position bias, not a win
        ("broken", "error", True),  # no verdict: an error, not a tie
    ]
    assert judgments[2].verdicts == ("A", "A") and judgments[3].verdicts == ("error", "error")
    sent = judge_server.requests[before:]
    assert len(sent) == 6 and all(r["temperature"] == 0 and r["model"] == JUDGE_MODEL for r in sent)
    by_system = Counter(r["messages"][0]["content"] for r in sent)
    assert by_system == {SYSTEM_PROMPT: 4, SYSTEM_PROMPT_REF: 2}  # the math question shows its reference


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    """A sharpened tiny random Llama with the real tokenizer and its RTN and AWQ checkpoints (group 32)."""
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("judge")
    model_dir = root / "tiny-llama"
    model = build_tiny_model("llama", len(tokenizer))
    # Random init repeats one token whatever the prompt; larger weights (as test_eval's sharpen) give
    # answers that differ between questions and between the float and quantized models.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(5)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    dirs = {FP_NAME: model_dir}
    for method in ("rtn", "awq"):
        dirs[method] = root / method
        quantize_checkpoint(
            model_dir,
            dirs[method],
            QuantSpec(method=method, group_size=32),
            CalibrationSpec(("en",), 2, 32),
            None,
            False,
        )
    return dirs


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def eval_args(dirs: dict[str, Path], out: Path) -> list[str]:
    return [
        "eval",
        "--model",
        str(dirs[FP_NAME]),
        "--checkpoint",
        f"awq={dirs['awq']}",
        "--checkpoint",
        f"rtn={dirs['rtn']}",
        "--langs",
        "ko",
        "--max-tokens",
        "64",
        "--seq-len",
        "32",
        "--quiet",
        "--out",
        str(out),
    ]


def greedy_reference(model_dir: Path, tokenizer, question: str, steps: int) -> str:
    """Written out independently: the plain prompt, argmax step by step without a cache, stop at <eos>."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(f"질문: {question}\n답변:")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    text = tokenizer.decode(new, skip_special_tokens=True)
    return text.split("\n질문:", 1)[0].split("\n답변:", 1)[0].strip()


def test_eval_with_the_judge_end_to_end(
    judge_server: JudgeServer,
    tiny_checkpoints: dict[str, Path],
    tokenizer,
    tmp_path: Path,
    capsys,
    monkeypatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)  # the server refuses any other key
    out = tmp_path / "results"
    before = len(judge_server.requests)
    code, stdout, stderr = run_cli(
        capsys,
        *eval_args(tiny_checkpoints, out),
        "--judge-url",
        judge_server.url,
        "--judge-questions",
        "8",
        "--judge-max-tokens",
        "6",
        "--judge-parallel",
        "2",
    )
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "eval.json",
        "eval.md",
        "eval.png",
        "judge.json",
        "judge.md",
    ]
    data = json.loads((out / "judge.json").read_text())
    assert data["judge"] == {**data["judge"], "url": judge_server.url, "model": JUDGE_MODEL, "temperature": 0}
    assert data["questions"] == {"source": "packaged", "count": 8, "categories": dict.fromkeys(CATEGORIES, 1)}
    assert [m["name"] for m in data["models"]] == [FP_NAME, "awq", "rtn"]
    pairs = [("awq", FP_NAME), ("rtn", FP_NAME), ("rtn", "awq")]
    assert [(p["first"], p["second"]) for p in data["pairs"]] == pairs

    # Every count follows from the recorded answers and the length rule, in both orders.
    items = data["items"]
    assert [i["id"] for i in items] == [f"{c}-01" for c in CATEGORIES]
    answers = {m: {i["id"]: i["answers"][m] for i in items} for m in (FP_NAME, "awq", "rtn")}
    assert all(answers[m][q] for m in answers for q in answers[m])
    assert len({a for m in answers for a in answers[m].values()}) > 8  # the models do differ
    for pair, summary in zip(pairs, data["pairs"], strict=True):
        outcomes = [expected_outcome(answers[pair[0]][q], answers[pair[1]][q]) for q in answers[FP_NAME]]
        counts = {o: outcomes.count(o) for o in ("win", "tie", "loss")} | {"error": 0}
        assert summary["counts"] == counts
        assert summary["win_rate"] == pytest.approx((counts["win"] + counts["tie"] / 2) / 8)
        for category, per in summary["categories"].items():
            assert sum(per["counts"].values()) == 1, category
    asked = [j for i in items for j in i["judgments"] if j["asked"]]
    sent = judge_server.requests[before:]
    assert len(sent) == 2 * len(asked) and all(r["temperature"] == 0 for r in sent)

    # The answers are the models' greedy ones on the plain prompt (the tokenizer has no chat template).
    question = items[0]["question"]
    assert answers[FP_NAME]["writing-01"] == greedy_reference(
        tiny_checkpoints[FP_NAME], tokenizer, question, 6
    )

    md = (out / "judge.md").read_text()
    first = data["pairs"][0]["counts"]
    assert f"| awq vs fp | {first['win']} | {first['tie']} | {first['loss']} | 0 |" in md
    assert "| pair | writing | roleplay | reasoning | math | coding | extraction | stem | humanities |" in md
    assert md in stdout and f"judge results: {out / 'judge.md'}, {out / 'judge.json'}" in stdout


def test_judge_mistakes_give_one_clear_line(
    judge_server: JudgeServer, tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cases = [
        (["--judge-url", dead], f"cannot reach the judge at {dead}: "),
        (["--judge-url", judge_server.url], f"the judge at {judge_server.url} answered HTTP 401"),
        (["--judge-url", judge_server.url, "--judge-key", KEY, "--judge-categories", "poetry"], "'poetry'"),
        (["--judge-questions", "8"], "--judge-questions needs --judge-url"),
        (
            ["--judge-url", judge_server.url, "--judge-max-tokens", "0"],
            "--judge-max-tokens must be at least 1",
        ),
    ]
    for extra, expected in cases:
        out = tmp_path / "out"
        code, _, stderr = run_cli(capsys, *eval_args(tiny_checkpoints, out), *extra)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr
        assert lines[0].startswith("lape-awq: error: ") and expected in lines[0], stderr
        # Every judge mistake is caught before a model is loaded or a report written.
        assert not out.exists()
