"""The quantized vocabulary's quality on its own: the default model (Gemma 3 270M) with its decoder left in
float and only the vocabulary (its tied embedding / LM head) quantized, per variant: bits, group size, the
clipping search, and which rows stay FP16 (rule, languages, budget). Reports perplexity change against the
float model on held-out text, KL and top-1 agreement, the vocabulary's bytes, and the share of the 4-bit
vocabulary's Korean loss the kept rows recover. The row-selection rule and the default recipe
(quant/vocab/) were chosen from this table.

Rules compared for the kept rows (all from the fit part of the built-in corpus, never the held-out part):
  text+script  the language's tokens by frequency in its fit text, then its script's other tokens by
               tokenizer rank (the default, quant/vocab/rows.py)
  script       the tokens holding a character of the language's script, by tokenizer rank only
  pooled       the most frequent tokens of the 8 languages' fit text together (each language's frequencies
               normalised), so English and the others get their share

Writes bench/results/vocab_quality_<date>.{json,md}.

    lape-awq bench vocab [--langs ko,en] [--max-tokens 4096] [--other-langs ...] [--other-max-tokens 1024]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lape_awq.bench.formatting import MiB, change, number, percent
from lape_awq.bench.run_info import result_header, write_json
from lape_awq.quant.cli.arguments import csv_list
from lape_awq.quant.file_io import write_atomic
from lape_awq.quant.text_sources import DEFAULT_LANGUAGES

DEFAULT_RULE = "text+script"


@dataclass(frozen=True)
class Variant:
    """One way to store the vocabulary; `all_langs`: also scored on the other languages."""

    name: str
    bits: int
    group_size: int = 128
    clip: bool = True
    rule: str | None = None  # None: no kept rows
    langs: tuple[str, ...] = ()
    rows: int = 0
    all_langs: bool = False


VARIANTS = (
    Variant("8-bit", 8, all_langs=True),
    Variant("4-bit, no clipping search", 4, clip=False),
    Variant("4-bit", 4, all_langs=True),
    Variant("4-bit + 1,024 ko rows", 4, rule=DEFAULT_RULE, langs=("ko",), rows=1024),
    Variant(
        "4-bit + 2,048 ko rows (default)", 4, rule=DEFAULT_RULE, langs=("ko",), rows=2048, all_langs=True
    ),
    Variant("4-bit + 4,096 ko rows", 4, rule=DEFAULT_RULE, langs=("ko",), rows=4096),
    Variant("4-bit + 2,048 ko rows, script only", 4, rule="script", langs=("ko",), rows=2048),
    Variant(
        "4-bit + 2,048 ko rows, no clipping search",
        4,
        clip=False,
        rule=DEFAULT_RULE,
        langs=("ko",),
        rows=2048,
    ),
    Variant(
        "4-bit + 4,096 rows, ko and en", 4, rule=DEFAULT_RULE, langs=("ko", "en"), rows=4096, all_langs=True
    ),
    Variant(
        "4-bit + 4,096 rows, 8 languages pooled",
        4,
        rule="pooled",
        langs=DEFAULT_LANGUAGES,
        rows=4096,
        all_langs=True,
    ),
    Variant("4-bit group 64 + 2,048 ko rows", 4, group_size=64, rule=DEFAULT_RULE, langs=("ko",), rows=2048),
)


class VocabVariant(nn.Module):
    """The float model with another vocabulary matrix: its decoder shared, not copied."""

    def __init__(self, base: nn.Module, weight: torch.Tensor, module: str):
        super().__init__()
        self.base = [base]  # a list: not a submodule, so its parameters are not this module's
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.name = f"{module}.weight"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # tie_weights (the default) makes a tied LM head follow the new embedding.
        return torch.func.functional_call(self.base[0], {self.name: self.weight}, args, kwargs)


def kept_rows(variant: Variant, tokenizer: Any, vocab_size: int) -> torch.Tensor | None:
    from lape_awq.quant.text_sources import builtin_text
    from lape_awq.quant.vocab.rows import script_tokens, select_rows, token_counts

    if variant.rule is None:
        return None
    if variant.rule == DEFAULT_RULE:
        return select_rows(
            tokenizer, [builtin_text(lang, "fit") for lang in variant.langs], vocab_size, variant.rows
        )
    if variant.rule == "script":
        return script_tokens(tokenizer, variant.langs[0], vocab_size).nonzero()[: variant.rows, 0]
    if variant.rule == "pooled":
        counts = [
            token_counts(tokenizer, builtin_text(lang, "fit"), vocab_size) for lang in DEFAULT_LANGUAGES
        ]
        pooled = sum(c / c.sum() for c in counts)
        return pooled.argsort(descending=True, stable=True)[: variant.rows].sort().values
    raise ValueError(variant.rule)


def vocab_bytes(variant: Variant, vocab_size: int, hidden: int, kept: int) -> int:
    """Codes, fp16 scales and uint8 zero points, plus 4 + 2 H bytes per kept row."""
    groups = hidden // variant.group_size
    return vocab_size * (hidden * variant.bits // 8 + 3 * groups) + kept * (4 + 2 * hidden)


def build_variants(
    model: nn.Module, tokenizer: Any, progress: bool
) -> tuple[dict[str, nn.Module], list[dict]]:
    from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
    from lape_awq.quant.vocab.quantizer import (
        VocabSpec,
        clip_importance,
        hidden_second_moment,
        quantize_vocab,
    )

    module = "model.embed_tokens"
    weight = model.get_submodule(module).weight.detach()
    vocab_size, hidden = weight.shape
    importance = clip_importance(
        hidden_second_moment(model, calibration_batch(tokenizer, CalibrationSpec())), True, True
    )
    bases: dict[tuple, torch.Tensor] = {}  # (bits, group, clip) -> dequantized codes: rules share them
    models, info = {}, []
    for variant in VARIANTS:
        started = time.perf_counter()
        key = (variant.bits, variant.group_size, variant.clip)
        if key not in bases:
            spec = VocabSpec(variant.bits, variant.group_size)
            bases[key] = quantize_vocab(weight, spec, None, importance, clip=variant.clip).quant.dequantize()
        dense = bases[key].clone()
        rows = kept_rows(variant, tokenizer, vocab_size)
        if rows is not None:  # the checkpoint's kept rows: dequantized codes + their fp16 residual
            dense[rows] += (weight[rows] - dense[rows]).half().float()
        models[variant.name] = VocabVariant(model, dense, module)
        kept = 0 if rows is None else len(rows)
        info.append(
            {
                **asdict(variant),
                "kept_rows": kept,
                "vocab_bytes": vocab_bytes(variant, vocab_size, hidden, kept),
            }
        )
        if progress:
            print(f"  {variant.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return models, info


def rows_baseline(variants: list[dict[str, Any]], name: str) -> str | None:
    """The variant quantized alike (bits, group size, clipping) without kept rows, if one was measured."""
    info = {v["name"]: v for v in variants}
    mine = info[name]
    if mine["rule"] is None:
        return None
    alike = [
        v
        for v in variants
        if v["rule"] is None and all(v[k] == mine[k] for k in ("bits", "group_size", "clip"))
    ]
    return alike[0]["name"] if alike else None


def recovery(result: dict[str, Any], name: str, baseline: str | None, lang: str = "ko") -> float | None:
    """Share of `baseline`'s perplexity loss against float that `name` recovers."""
    models = {m["name"]: m["langs"] for m in result["models"]}
    if baseline not in models or name not in models or lang not in models[name]:
        return None
    base, ppl = models[baseline][lang]["ppl"], models[name][lang]["ppl"]
    fp = models[result["reference"]][lang]["ppl"]
    return (base - ppl) / (base - fp) if base != fp else None


def markdown_table(record: dict[str, Any]) -> str:
    """Per variant: kept rows, vocabulary MiB, then ppl change vs float per main language, ko recovery, KL,
    top-1; the other languages' mean ppl change where they were scored."""
    main, other = record["main"], record.get("other")
    langs = list(main["texts"])
    info = {v["name"]: v for v in record["variants"]}
    other_models = {m["name"]: m["langs"] for m in other["models"]} if other else {}
    head = ["vocabulary", "kept rows", "MiB"] + [f"{lang} ppl vs float" for lang in langs]
    head += ["ko loss recovered"] if "ko" in langs else []
    head += [f"KL {lang}" for lang in langs] + [f"top-1 {lang}" for lang in langs]
    head += [f"{', '.join(other['texts'])}: mean ppl vs float"] if other else []
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for model in main["models"]:
        name, scores = model["name"], model["langs"]
        float_row = name == main["reference"]
        v = info.get(name)
        cells = ["float" if float_row else name, "" if float_row else f"{v['kept_rows']:,}"]
        cells.append(number(record["float_bytes"] / MiB) if float_row else number(v["vocab_bytes"] / MiB))
        cells += [
            number(scores[lang]["ppl"], 2) if float_row else change(scores[lang]["ppl_change_pct"])
            for lang in langs
        ]
        if "ko" in langs:
            share = None if float_row else recovery(main, name, rows_baseline(record["variants"], name))
            cells.append("" if share is None else percent(share))
        cells += ["" if float_row else number(scores[lang]["kl"], 4) for lang in langs]
        cells += ["" if float_row else percent(scores[lang]["top1"]) for lang in langs]
        if other:
            theirs = other_models.get(name)
            if theirs is None or float_row:
                cells.append("")
            else:
                cells.append(change(sum(s["ppl_change_pct"] for s in theirs.values()) / len(theirs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--langs", type=csv_list, default=["ko", "en"], help="languages every variant is scored on"
    )
    parser.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens per language")
    parser.add_argument("--other-langs", type=csv_list, default=["zh", "ja", "fr", "es", "vi", "id"])
    parser.add_argument("--other-max-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from lape_awq.quant.default_model import prepare_default_model
    from lape_awq.quant.evaluation.scoring import evaluate
    from lape_awq.quant.model_loading import load_causal_lm
    from lape_awq.quant.text_sources import builtin_text

    started = time.perf_counter()
    model, tokenizer = load_causal_lm(prepare_default_model(), torch.float32)
    models, info = build_variants(model, tokenizer, not args.quiet)
    texts = [builtin_text(lang, "heldout") for lang in args.langs]
    main = evaluate(model, tokenizer, models, texts, max_tokens=args.max_tokens, progress=not args.quiet)
    record: dict[str, Any] = {
        **result_header("vocab_quality"),
        "float_bytes": model.get_input_embeddings().weight.numel() * 2,
        "variants": info,
        "main": main.to_json(),
    }
    if args.other_langs:
        chosen = {v.name: models[v.name] for v in VARIANTS if v.all_langs}
        others = [builtin_text(lang, "heldout") for lang in args.other_langs]
        other = evaluate(
            model, tokenizer, chosen, others, max_tokens=args.other_max_tokens, progress=not args.quiet
        )
        record["other"] = other.to_json()
    record["seconds"] = round(time.perf_counter() - started, 1)
    path = write_json(args.out / f"vocab_quality_{record['date'][:10]}.json", record)
    table = markdown_table(record)
    write_atomic(path.with_suffix(".md"), table)
    print(table)
    print(f"wrote {path} and its .md table")
    return 0


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
