"""Pairwise judge, MT-Bench style: every contender (the float model and each checkpoint) answers the
Korean questions greedily, then an OpenAI-compatible judge compares each pair of answers.

Each pair is judged twice, the answers swapped the second time; a win needs both orders to agree,
anything else is a tie (MT-Bench's rule against position bias). A reply without a verdict makes the
question an "error", kept out of the win rate and never counted as a tie.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lape_awq.quant.errors import UserError
from lape_awq.quant.judge_questions import Question

DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_PARALLEL = 4
JUDGE_REPLY_TOKENS = 2048  # MT-Bench's judge budget: an explanation, then the verdict
JUDGE_TIMEOUT_S = 300.0
KEY_ENV = "LAPE_AWQ_JUDGE_KEY"
OUTCOMES = ("win", "tie", "loss", "error")
# For tokenizers without a chat template (base models such as the default Gemma 3 270M).
PLAIN_PROMPT = "질문: {question}\n답변:"
# A base model on the plain prompt tends to go on in its format, with a new question or another answer:
# the answer ends where either starts.
_PLAIN_MARKERS = ("\n질문:", "\n답변:")

_COMMON = (
    "Avoid any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your evaluation. Do not "
    "favor certain names of the assistants. Be as objective as possible. After providing your explanation, "
    'output your final verdict by strictly following this format: "[[A]]" if assistant A is better, '
    '"[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
# The user asks in Korean: an answer in another language, or in broken Korean, serves them worse.
_KOREAN = "The question is in Korean; a good answer is written in correct, natural Korean. "
# MT-Bench's "pair-v2" (general questions) and "pair-math-v1" (questions with a reference answer).
SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows the "
    "user's instructions and answers the user's question better. Your evaluation should consider factors "
    "such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of their "
    "responses. " + _KOREAN + "Begin your evaluation by comparing the two responses and provide a short "
    "explanation. " + _COMMON
)
SYSTEM_PROMPT_REF = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. Your evaluation should consider correctness and "
    "helpfulness. You will be given a reference answer, assistant A's answer, and assistant B's answer. "
    "Your job is to evaluate which assistant's answer is better. " + _KOREAN + "Begin your evaluation by "
    "comparing both assistants' answers with the reference answer. Identify and correct any mistakes. "
    + _COMMON
)
_ANSWERS = (
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
USER_TEMPLATE = "[User Question]\n{question}\n\n" + _ANSWERS
USER_TEMPLATE_REF = (
    "[User Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n" + _ANSWERS
)
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def contender_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every pair once, the later model first: [fp, awq, opt] -> (awq, fp), (opt, fp), (opt, awq)."""
    return [(names[j], names[i]) for j in range(1, len(names)) for i in range(j)]


def parse_verdict(reply: str) -> str:
    """The verdict in the judge's reply: A, B, C (tie), or "error" when it holds none. The last one
    counts: the verdict comes after the explanation, which may quote the format."""
    found = _VERDICT.findall(reply or "")
    return found[-1] if found else "error"


def combine(first_as_a: str, first_as_b: str) -> str:
    """The outcome for the first model from its two verdicts (as assistant A, then as B)."""
    if "error" in (first_as_a, first_as_b):
        return "error"
    as_a = {"A": "win", "B": "loss", "C": "tie"}[first_as_a]
    as_b = {"A": "loss", "B": "win", "C": "tie"}[first_as_b]
    return as_a if as_a == as_b else "tie"


def win_rate(counts: Mapping[str, int]) -> float | None:
    """(win + tie / 2) / (judged - error); None when nothing was judged without error."""
    n = sum(counts[o] for o in OUTCOMES) - counts["error"]
    return (counts["win"] + 0.5 * counts["tie"]) / n if n else None


def judge_messages(question: Question, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The system and user messages for one comparison, with the reference answer where there is one."""
    if question.reference:
        system = SYSTEM_PROMPT_REF
        user = USER_TEMPLATE_REF.format(
            question=question.question, reference=question.reference, answer_a=answer_a, answer_b=answer_b
        )
    else:
        system = SYSTEM_PROMPT
        user = USER_TEMPLATE.format(question=question.question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# --- answers --------------------------------------------------------------------------------------------


def prompt_ids(tokenizer: Any, question: str) -> tuple[list[int], bool]:
    """Token ids of the prompt, and whether it is the plain one (the tokenizer has no chat template)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        # The template writes <bos> itself where the model wants one.
        return tokenizer(text, add_special_tokens=False)["input_ids"], False
    return tokenizer(PLAIN_PROMPT.format(question=question))["input_ids"], True


def _stop_at_plain_marker(tokenizer: Any, prompt_len: int) -> Any:
    """A StoppingCriteria ending generation once the new text holds a plain-prompt marker."""
    from transformers import StoppingCriteria

    class StopAtPlainMarker(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            # A marker is a few tokens long: decoding the tail is enough, and O(1) per step.
            new = input_ids[0, max(prompt_len, input_ids.shape[1] - 16) :]
            tail = tokenizer.decode(new, skip_special_tokens=True)
            done = any(m in tail for m in _PLAIN_MARKERS)
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StopAtPlainMarker()


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-sequence ids from the generation config (chat models list their end-of-turn there) and
    the tokenizer."""
    ids: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@torch.inference_mode()
def generate_answer(model: nn.Module, tokenizer: Any, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one question, special tokens removed."""
    from transformers import GenerationConfig, StoppingCriteriaList

    ids, plain = prompt_ids(tokenizer, question)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    # A fresh config: the model's own may ask for sampling; the answers must be greedy and reproducible.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None, pad_token_id=pad
    )
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    stop = StoppingCriteriaList([_stop_at_plain_marker(tokenizer, len(ids))] if plain else [])
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config,
        stopping_criteria=stop,
    )  # fmt: skip
    answer = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    if plain:
        for marker in _PLAIN_MARKERS:
            answer = answer.split(marker, 1)[0]
    return answer.strip()


def generate_answers(
    models: Mapping[str, nn.Module],
    tokenizer: Any,
    questions: list[Question],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
) -> dict[str, dict[str, str]]:
    """model name -> question id -> answer."""
    if max_new_tokens < 1:
        raise UserError(f"--judge-max-tokens must be at least 1, got {max_new_tokens}")
    answers: dict[str, dict[str, str]] = {}
    for name, model in models.items():
        bar = tqdm(questions, desc=f"answers {name}", unit="question", disable=not progress)
        answers[name] = {q.id: generate_answer(model, tokenizer, q.question, max_new_tokens) for q in bar}
    return answers


# --- the judge ------------------------------------------------------------------------------------------


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
            print(f"lape-awq: warning: the judge at {url} does not list {model!r} "
                  f"(it lists {', '.join(listed[:5])}); trying it anyway", file=sys.stderr)  # fmt: skip
        return cls(url, model, client)

    def ask(self, messages: list[dict[str, str]]) -> str:
        """The judge's reply (temperature 0); empty when it returns no text."""
        with _judge_errors(self.url):
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=JUDGE_REPLY_TOKENS
            )
        choices = getattr(response, "choices", None) or []
        return (choices[0].message.content or "") if choices else ""


@dataclass(frozen=True)
class Judgment:
    """One pair on one question: the verdicts and replies with the first model as A, then as B.
    Identical answers are a tie without asking the judge (`asked` False)."""

    question_id: str
    category: str
    first: str
    second: str
    verdicts: tuple[str, str]
    replies: tuple[str, str]
    asked: bool = True

    @property
    def outcome(self) -> str:
        return combine(*self.verdicts)


@dataclass
class JudgeResult:
    """Everything a judge run produced: the questions, every answer, every judgment."""

    judge_url: str
    judge_model: str
    question_source: str
    questions: list[Question]
    max_new_tokens: int
    models: list[str]
    answers: dict[str, dict[str, str]]
    pairs: list[tuple[str, str]]
    judgments: list[Judgment]
    model_paths: dict[str, str] = field(default_factory=dict)

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(q.category for q in self.questions))

    def counts(self, pair: tuple[str, str], category: str | None = None) -> dict[str, int]:
        """win / tie / loss / error of the pair's first model, overall or in one category."""
        counts = dict.fromkeys(OUTCOMES, 0)
        for j in self.judgments:
            if (j.first, j.second) == pair and category in (None, j.category):
                counts[j.outcome] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        by_question: dict[str, list[Judgment]] = {}
        for j in self.judgments:
            by_question.setdefault(j.question_id, []).append(j)
        return {
            "judge": {
                "url": self.judge_url,
                "model": self.judge_model,
                "temperature": 0,
                "prompt": "MT-Bench pair-v2 (pair-math-v1 with a reference answer), both orders",
            },
            "questions": {
                "source": self.question_source,
                "count": len(self.questions),
                "categories": {c: sum(q.category == c for q in self.questions) for c in self.categories},
            },
            "max_new_tokens": self.max_new_tokens,
            "models": [{"name": m, "path": self.model_paths.get(m)} for m in self.models],
            "pairs": [
                {
                    "first": a,
                    "second": b,
                    **self._summary((a, b)),
                    "categories": {c: self._summary((a, b), c) for c in self.categories},
                }
                for a, b in self.pairs
            ],
            "items": [
                {
                    "id": q.id,
                    "category": q.category,
                    "question": q.question,
                    "reference": q.reference,
                    "answers": {m: self.answers[m][q.id] for m in self.models},
                    "judgments": [
                        {
                            "first": j.first,
                            "second": j.second,
                            "outcome": j.outcome,
                            "verdicts": list(j.verdicts),
                            "asked": j.asked,
                            "replies": list(j.replies),
                        }
                        for j in by_question.get(q.id, [])
                    ],
                }
                for q in self.questions
            ],
        }

    def _summary(self, pair: tuple[str, str], category: str | None = None) -> dict[str, Any]:
        counts = self.counts(pair, category)
        return {"counts": counts, "win_rate": win_rate(counts)}


def judge_answers(
    judge: JudgeClient,
    questions: list[Question],
    answers: Mapping[str, Mapping[str, str]],
    pairs: list[tuple[str, str]],
    parallel: int = DEFAULT_PARALLEL,
    progress: bool = True,
) -> list[Judgment]:
    """Ask the judge about every pair on every question, both orders, `parallel` requests at a time."""
    if parallel < 1:
        raise UserError(f"--judge-parallel must be at least 1, got {parallel}")
    jobs = [(q, a, b) for q in questions for a, b in pairs]
    replies: dict[tuple[int, int], str] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures: dict[Future[str], tuple[int, int]] = {}
        for i, (q, a, b) in enumerate(jobs):
            if answers[a][q.id] == answers[b][q.id]:
                continue
            for order, (x, y) in enumerate(((a, b), (b, a))):
                messages = judge_messages(q, answers[x][q.id], answers[y][q.id])
                futures[pool.submit(judge.ask, messages)] = (i, order)
        bar = tqdm(total=len(futures), desc="judge", unit="request", disable=not progress)
        try:
            for future in as_completed(futures):
                replies[futures[future]] = future.result()
                bar.update()
        except BaseException:
            # The first failure ends the run: queued requests would only fail the same way.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
    judgments = []
    for i, (q, a, b) in enumerate(jobs):
        if (i, 0) not in replies:
            judgments.append(Judgment(q.id, q.category, a, b, ("C", "C"), ("", ""), asked=False))
            continue
        pair_replies = (replies[i, 0], replies[i, 1])
        verdicts = (parse_verdict(pair_replies[0]), parse_verdict(pair_replies[1]))
        judgments.append(Judgment(q.id, q.category, a, b, verdicts, pair_replies))
    return judgments


def run_judge(
    judge: JudgeClient,
    models: Mapping[str, nn.Module],
    tokenizer: Any,
    questions: list[Question],
    *,
    question_source: str = "packaged",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    parallel: int = DEFAULT_PARALLEL,
    progress: bool = True,
    model_paths: Mapping[str, str] | None = None,
) -> JudgeResult:
    """Answers of every model, then the judge on every pair (the later model first)."""
    if len(models) < 2:
        raise UserError("the judge compares models pairwise: it needs at least two")
    answers = generate_answers(models, tokenizer, questions, max_new_tokens, progress)
    pairs = contender_pairs(list(models))
    judgments = judge_answers(judge, questions, answers, pairs, parallel, progress)
    return JudgeResult(
        judge_url=judge.url,
        judge_model=judge.model,
        question_source=question_source,
        questions=list(questions),
        max_new_tokens=max_new_tokens,
        models=list(models),
        answers=answers,
        pairs=pairs,
        judgments=judgments,
        model_paths=dict(model_paths or {}),
    )
