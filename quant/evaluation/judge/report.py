"""Views of a judge run: a markdown summary and a JSON file with every answer and reply, written atomically
next to the eval reports."""

from __future__ import annotations

import json
from pathlib import Path

from lape_awq.quant.evaluation.judge.pairwise import JudgeResult
from lape_awq.quant.evaluation.judge.verdicts import OUTCOMES, win_rate
from lape_awq.quant.file_io import write_atomic
from lape_awq.quant.provenance import tool_stamp

MARKDOWN, JSON = "judge.md", "judge.json"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def markdown(result: JudgeResult) -> str:
    """Win / tie / loss / error and the win rate of each pair's first model, overall and per category."""
    n = len(result.questions)
    source = "the packaged Korean questions" if result.question_source == "packaged" else "questions"
    parts = [
        f"**Pairwise judge**: `{result.judge_model}` at {result.judge_url}, {n} of {source} "
        f"({', '.join(result.categories)}); greedy answers of at most {result.max_new_tokens} new tokens. "
        "Each pair is judged in both orders: a win needs both to agree, anything else is a tie; "
        "`error`: a reply without a verdict. Win rate of the first model: "
        "(win + tie/2) / (questions - error).",
        "",
        "| pair | " + " | ".join(OUTCOMES) + " | win rate |",
        "|---|" + "---:|" * (len(OUTCOMES) + 1),
    ]
    for pair in result.pairs:
        counts = result.counts(pair)
        cells = [str(counts[o]) for o in OUTCOMES] + [_rate(win_rate(counts))]
        parts.append(f"| {pair[0]} vs {pair[1]} | " + " | ".join(cells) + " |")
    categories = result.categories
    if len(categories) > 1:
        parts += [
            "",
            "**Win rate per category** (first model of each pair)",
            "",
            "| pair | " + " | ".join(categories) + " |",
            "|---|" + "---:|" * len(categories),
        ]
        for pair in result.pairs:
            rates = [_rate(win_rate(result.counts(pair, c))) for c in categories]
            parts.append(f"| {pair[0]} vs {pair[1]} | " + " | ".join(rates) + " |")
    return "\n".join(parts) + "\n"


def json_text(result: JudgeResult) -> str:
    data = {**tool_stamp(), **result.to_json()}
    return json.dumps(data, indent=2, ensure_ascii=False)


def write_reports(result: JudgeResult, out_dir: Path) -> dict[str, Path]:
    """judge.md and judge.json in `out_dir` (created if needed); returns the paths by format."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / MARKDOWN, "json": out_dir / JSON}
    write_atomic(paths["markdown"], markdown(result).encode())
    write_atomic(paths["json"], (json_text(result) + "\n").encode())
    return paths
