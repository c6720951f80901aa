"""The pairwise judge run, MT-Bench style: every contender (the float model and each checkpoint) answers
the Korean questions greedily (answers.py), then an OpenAI-compatible judge (client.py) compares each pair
of answers (verdicts.py); this module runs the pairs and holds the result.

Each pair is judged twice, the answers swapped the second time; a win needs both orders to agree,
anything else is a tie (MT-Bench's rule against position bias). A reply without a verdict makes the
question an "error", kept out of the win rate and never counted as a tie.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm import tqdm

from lape_awq.quant.errors import UserError
from lape_awq.quant.evaluation.judge.answers import DEFAULT_MAX_NEW_TOKENS, generate_answers
from lape_awq.quant.evaluation.judge.client import JudgeClient
from lape_awq.quant.evaluation.judge.questions import Question
from lape_awq.quant.evaluation.judge.verdicts import (
    OUTCOMES,
    combine,
    contender_pairs,
    judge_messages,
    parse_verdict,
    win_rate,
)

DEFAULT_PARALLEL = 4


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
