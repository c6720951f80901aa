"""MT-Bench's pairwise prompts (with a line for Korean), verdict parsing, and the two-order rule: a win
needs both orders to agree, anything else is a tie; a reply without a verdict is an "error"."""

from __future__ import annotations

import re
from collections.abc import Mapping

from lape_awq.quant.evaluation.judge.questions import Question

OUTCOMES = ("win", "tie", "loss", "error")

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
