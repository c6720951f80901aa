"""Views of an evaluation: markdown tables, a JSON file and a grouped-bar PNG, written atomically."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

from lape_awq.quant.evaluation.scoring import FP_NAME, EvalResult
from lape_awq.quant.file_io import write_atomic
from lape_awq.quant.provenance import tool_stamp

MARKDOWN, JSON, PNG = "eval.md", "eval.json", "eval.png"


def _ppl(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3f}"


def _table(
    result: EvalResult,
    models: list[str],
    cell: Callable[[str, str], float],
    fmt: Callable[[float], str],
    mean: bool = True,
) -> list[str]:
    """Rows: models; columns: languages, then (with `mean`) the plain mean over languages."""
    header = [*result.langs, "mean"] if mean else result.langs
    lines = ["| model | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for m in models:
        values = [cell(m, lang) for lang in result.langs]
        cells = [fmt(v) for v in values] + ([fmt(sum(values) / len(values))] if mean else [])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: EvalResult) -> str:
    """One table per metric; the change, KL and top-1 tables hold only the quantized models."""
    quantized = [m for m in result.models if m != FP_NAME]
    fp_tokens = ", ".join(f"{lang} {result.score(FP_NAME, lang).tokens:,}" for lang in result.langs)
    parts = [
        f"Held-out text: the first {result.max_tokens:,} tokens per language in windows of "
        f"{result.seq_len} tokens; scored tokens: {fp_tokens}.",
        "",
        "**Perplexity** (lower is better; not comparable across languages: their tokenizations differ)",
        "",
        *_table(result, result.models, lambda m, lang: result.score(m, lang).ppl, _ppl, mean=False),
    ]
    if quantized:
        parts += [
            "",
            f"**Perplexity change vs {FP_NAME}** (%)",
            "",
            *_table(result, quantized, result.ppl_change, lambda v: f"{v:+.2f}%"),
            "",
            f"**KL({FP_NAME} ‖ model)** (nats per token, mean over positions)",
            "",
            *_table(result, quantized, lambda m, lang: result.score(m, lang).kl, lambda v: f"{v:.4f}"),
            "",
            f"**Top-1 agreement with {FP_NAME}** (%)",
            "",
            *_table(
                result, quantized, lambda m, lang: result.score(m, lang).top1, lambda v: f"{100 * v:.1f}%"
            ),
        ]
    return "\n".join(parts) + "\n"


def json_text(result: EvalResult) -> str:
    return json.dumps({**tool_stamp(), **result.to_json()}, indent=2)


def load_json(path: Path) -> EvalResult:
    return EvalResult.from_json(json.loads(Path(path).read_text()))


def plot_png(result: EvalResult) -> bytes:
    """Grouped bars: per-language perplexity of each model, and its change against the float model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(result.langs))
    quantized = [m for m in result.models if m != FP_NAME]
    fig, axes = plt.subplots(1, 2 if quantized else 1, figsize=(13 if quantized else 7, 4.2), squeeze=False)
    ax_ppl, width = axes[0][0], 0.8 / len(result.models)
    for i, m in enumerate(result.models):
        ax_ppl.bar(x + i * width, [result.score(m, lang).ppl for lang in result.langs], width, label=m)
    ax_ppl.set_title("held-out perplexity per language")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.set_xticks(x + width * (len(result.models) - 1) / 2, result.langs)
    if quantized:
        ax_chg, width_q = axes[0][1], 0.8 / len(quantized)
        for i, m in enumerate(quantized):
            values = [result.ppl_change(m, lang) for lang in result.langs]
            ax_chg.bar(x + i * width_q, values, width_q, label=m, color=f"C{i + 1}")
        ax_chg.axhline(0, color="0.3", linewidth=0.8)
        ax_chg.set_title(f"perplexity change vs {FP_NAME}")
        ax_chg.set_ylabel("%")
        ax_chg.set_xticks(x + width_q * (len(quantized) - 1) / 2, result.langs)
    # One legend above both panels: a model has the same colour in each, and no bar is hidden.
    fig.legend(*ax_ppl.get_legend_handles_labels(), loc="upper center", ncol=min(len(result.models), 6))
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_reports(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    """eval.md, eval.json and eval.png in `out_dir` (created if needed); returns the paths by format."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "markdown": (MARKDOWN, markdown(result).encode()),
        "json": (JSON, (json_text(result) + "\n").encode()),
        "png": (PNG, plot_png(result)),
    }
    paths = {}
    for kind, (name, data) in contents.items():
        write_atomic(out_dir / name, data)
        paths[kind] = out_dir / name
    return paths
