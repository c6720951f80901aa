"""The Korean questions of the pairwise judge: the packaged set (80, MT-Bench's 8 categories x 10) or a
user JSONL file with the same fields, filtered by category and cut to a category-balanced sample."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from lape_awq.quant.errors import UserError
from lape_awq.quant.text_sources import read_user_file

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
PACKAGED = "ko_judge_questions.jsonl"


@dataclass(frozen=True)
class Question:
    """One single-turn question; `reference` (math, reasoning) is shown to the judge as the right answer."""

    id: str
    category: str
    question: str
    reference: str | None = None


def packaged_questions_path() -> Any:
    """The packaged question file (a Traversable: a plain Path in a normal or editable install)."""
    return files("lape_awq.quant.evaluation.judge") / "data" / PACKAGED


def parse_questions(text: str, source: str) -> list[Question]:
    """Questions from JSONL text (one object per line, blank lines skipped); errors name the line."""
    questions: list[Question] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}, line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object with id, category and question")
        qid, category, question = item.get("id"), item.get("category"), item.get("question")
        reference = item.get("reference")
        # Ids may be numbers (MT-Bench's question_id) or strings; they are compared and stored as text.
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or not str(qid).strip():
            raise UserError(f"{where}: 'id' must be a non-empty string or an integer")
        for name, value in (("category", category), ("question", question)):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: {name!r} must be a non-empty string")
        if reference is not None and (not isinstance(reference, str) or not reference.strip()):
            raise UserError(f"{where}: 'reference' must be a non-empty string when given")
        qid = str(qid).strip()
        if qid in seen:
            raise UserError(f"{where}: id {qid!r} is used twice")
        seen.add(qid)
        questions.append(Question(qid, category.strip(), question.strip(), reference))
    if not questions:
        raise UserError(f"{source} holds no questions")
    return questions


def load_questions(path: Path | None = None) -> tuple[list[Question], str]:
    """The user file at `path`, else the packaged set; with a description of where they came from."""
    if path is None:
        return parse_questions(packaged_questions_path().read_text(encoding="utf-8"), PACKAGED), "packaged"
    text, path = read_user_file(path, "question file")
    return parse_questions(text, str(path)), str(path.resolve())


def select_questions(
    questions: list[Question], categories: list[str] | None = None, limit: int | None = None
) -> list[Question]:
    """Keep `categories` (all if None), then at most `limit` questions, taken round-robin over the
    categories so they stay balanced (counts differ by at most one); file order is kept."""
    if limit is not None and limit < 1:
        raise UserError(f"--judge-questions must be at least 1, got {limit}")
    present = list(dict.fromkeys(q.category for q in questions))
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise UserError(
                f"no questions in category {unknown[0]!r}; the questions have: {', '.join(present)}"
            )
        questions = [q for q in questions if q.category in categories]
    if limit is None or limit >= len(questions):
        return list(questions)
    by_category: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_category.setdefault(q.category, []).append(i)
    picked: list[int] = []
    rank = 0
    while len(picked) < limit:
        for indices in by_category.values():
            if rank < len(indices) and len(picked) < limit:
                picked.append(indices[rank])
        rank += 1
    return [questions[i] for i in sorted(picked)]
