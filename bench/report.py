"""`lape-awq bench report`: the FP / AWQ / AWQ-opt table and the README's Results, built from result files.

Reads the newest result files in bench/results (by the date in their names):
- quality: every `*eval.json` of every `quality_<date>/` folder (`lape-awq eval`), newest first: evals of
  the same texts merge into one table, a checkpoint name scored twice keeping its newest scores; the
  `*judge.json` of the newest folder that has one,
- the quantized vocabulary alone: `vocab_quality_<date>.json` (`lape-awq bench vocab`),
- engine speed: `vllm_speed_<date>.json` (`lape-awq bench engine`),
- serving: `serve_matrix_<date>.json` (`lape-awq bench serve`; runs saved with `--tag` are left out), and
  llama.cpp's agreement with our FP model: `gguf_agreement_<date>.json` (`lape-awq bench gguf`),
- offline pipeline: `pipeline_speed_<date>.json` (`lape-awq bench pipeline`),
- GPU kernels: `kernels_<card>_<date>.md` (`lape-awq bench kernels`), when a GPU has run it.

Writes bench/results/report_<date>.md (the seed paper's table: per method the quality columns, decode
tokens/s and memory) and, with --readme, replaces the README's Results section (between its
`<!-- results:begin -->` and `<!-- results:end -->` markers) with tables generated from the same files.

    lape-awq bench report [--readme README.md] [--awq NAME] [--awq-opt NAME]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lape_awq.bench.formatting import MiB, change, number, percent
from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import write_atomic

RESULTS = Path(__file__).parent / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# The quality_matrix.sh checkpoint names of the default recipe and its AWQ baseline (both with the default
# 4-bit vocabulary; names without `-v4` / `-v8` have the FP16 vocabulary of earlier defaults).
DEFAULT_AWQ, DEFAULT_AWQ_OPT = "awq-v4-mix8", "awq-opt-v4-mix8"
# Names of the three methods in each benchmark's records.
SPEED_METHODS = {"fp": "fp", "awq": "our awq", "awq-opt": "our awq-opt"}
SERVE_CONFIGS = {"fp": "fp", "awq": "awq", "awq-opt": "awq-opt"}
METHOD_LABELS = {"fp": "FP", "awq": "AWQ", "awq-opt": "AWQ-opt"}
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")


@dataclass
class Sources:
    """The result files a report is built from (None where none exists)."""

    evals: list[Path]
    judge: Path | None
    vocab: Path | None
    speed: Path | None
    serve: Path | None
    pipeline: Path | None
    kernels: Path | None
    gguf: Path | None = None
    pipeline_recipes: list[Path] = field(default_factory=list)  # tagged pipeline runs: other recipes


def _newest(paths: list[Path]) -> Path | None:
    dated = [(m.group(1), str(p), p) for p in paths if (m := _DATE.search(p.name))]
    return max(dated)[2] if dated else None


def _untagged(results: Path, benchmark: str) -> list[Path]:
    """`<benchmark>_<date>.json` files only: runs with a `--tag` are side experiments, not the reference."""
    pattern = re.compile(rf"{benchmark}_\d{{4}}-\d{{2}}-\d{{2}}\.json")
    return [p for p in results.glob(f"{benchmark}_*.json") if pattern.fullmatch(p.name)]


def _newest_per_tag(results: Path, benchmark: str) -> list[Path]:
    """The newest `<benchmark>_<date>_<tag>.json` of each tag, by tag."""
    pattern = re.compile(rf"{benchmark}_(\d{{4}}-\d{{2}}-\d{{2}})_(.+)\.json")
    newest: dict[str, tuple[str, Path]] = {}
    for path in results.glob(f"{benchmark}_*.json"):
        if match := pattern.fullmatch(path.name):
            date, tag = match.groups()
            if tag not in newest or date > newest[tag][0]:
                newest[tag] = (date, path)
    return [newest[tag][1] for tag in sorted(newest)]


def find_sources(results: Path) -> Sources:
    """The newest file of each kind under `results`; every quality folder's evals, newest folder first."""
    folders = sorted(
        (p for p in results.glob("quality_*") if p.is_dir() and _DATE.search(p.name)),
        key=lambda p: (_DATE.search(p.name).group(1), p.name),  # type: ignore[union-attr]
        reverse=True,
    )
    judges = [sorted(f.glob("*judge.json")) for f in folders]
    return Sources(
        evals=[p for f in folders for p in sorted(f.glob("*eval.json"))],
        judge=next((j[-1] for j in judges if j), None),
        vocab=_newest(_untagged(results, "vocab_quality")),
        speed=_newest(_untagged(results, "vllm_speed")),
        serve=_newest(_untagged(results, "serve_matrix")),
        pipeline=_newest(_untagged(results, "pipeline_speed")),
        kernels=_newest([p for p in results.glob("kernels_*.md") if "_smoke" not in p.name]),
        gguf=_newest(_untagged(results, "gguf_agreement")),
        pipeline_recipes=_newest_per_tag(results, "pipeline_speed"),
    )


def _load(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path else None


def _ppl_cell(result: dict[str, Any], reference: bool) -> str:
    return number(result["ppl"], 2) + ("" if reference else f" ({change(result['ppl_change_pct'])})")


# --- quality --------------------------------------------------------------------------------------------


def eval_groups(paths: list[Path]) -> list[dict[str, Any]]:
    """Eval files merged where they scored the same texts (same languages and token budget): a group has
    `langs`, `max_tokens`, `files` and `models` (name -> per-language results, FP first)."""
    groups: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        langs = tuple(data["texts"])
        key = (langs, data["max_tokens"], tuple(t["sha256"] for t in data["texts"].values()))
        group = groups.setdefault(
            key,
            {
                "langs": langs,
                "max_tokens": data["max_tokens"],
                "files": [],
                "reference": data["reference"],
                "models": {},
            },
        )
        group["files"].append(path)
        for model in data["models"]:
            group["models"].setdefault(model["name"], model["langs"])
    return list(groups.values())


def gap_closed(models: dict[str, Any], name: str, baseline: str, reference: str, lang: str) -> float | None:
    """Share of the baseline's perplexity gap to FP that `name` closes: (base - x) / (base - fp)."""
    if name not in models or baseline not in models or lang not in models[name]:
        return None
    fp, base, ppl = (models[n][lang]["ppl"] for n in (reference, baseline, name))
    return (base - ppl) / (base - fp) if base != fp else None


# quality_matrix.sh's names: METHOD[-opt[-NEURONS]][-ao][-qi][-gs][-c64|-c128][-ko2][-v4|-v8]-CALIBRATION.
# NEURONS says which kept neurons (random: the control; top4: LAPE top-rate 0.04; deep, lsens, sens: the
# --neuron-rule variants); ao, qi, gs: GPTQ's --act-order, --quantized-inputs, --grid-search.
_KEPT_PARTS = ("opt", "random", "top4", "deep", "lsens", "sens")
_VOCAB_PARTS = ("v4", "v8")
_CALIBRATION_PARTS = ("c64", "c128", "ko2")


def _calibration_baseline(name: str, models: dict[str, Any]) -> str | None:
    """The plain AWQ checkpoint with the same vocabulary and calibration as `name` (awq-opt-v4-mix8,
    gptq-mix8 -> awq[-v4]-mix8; gptq-c64-mix8 -> awq-c64-mix8), when it is another checkpoint of the group."""
    parts = name.split("-")
    if len(parts) < 2:
        return None
    kept = (p for p in parts if p in _CALIBRATION_PARTS + _VOCAB_PARTS)
    candidate = "-".join(["awq", *kept, parts[-1]])
    return candidate if candidate in models and candidate != name else None


def _kept_baseline(name: str, models: dict[str, Any]) -> str | None:
    """For a checkpoint with kept neurons, the same recipe without them (gptq-opt-mix8 -> gptq-mix8), when
    that is not already its plain-AWQ baseline."""
    parts = name.split("-")
    if "opt" not in parts:
        return None
    candidate = "-".join(p for p in parts if p not in _KEPT_PARTS)
    fit = candidate in models and candidate != _calibration_baseline(name, models)
    return candidate if fit else None


def quality_table(group: dict[str, Any]) -> str:
    """Every checkpoint of one eval group: perplexity (and its change vs FP) per language, KL(FP || Q)
    and top-1 agreement (per language for two languages, else their means), and with Korean the share of
    the same-calibration AWQ's ko gap each checkpoint closes, and for kept neurons on another method,
    the share of that method's gap they close."""
    langs, models, ref = group["langs"], group["models"], group["reference"]
    wide = len(langs) <= 2
    head = [f"{lang} ppl (vs FP)" for lang in langs]
    head += (
        [f"KL {lang}" for lang in langs] + [f"top-1 {lang}" for lang in langs]
        if wide
        else ["mean KL", "mean top-1"]
    )
    baselines = [_calibration_baseline, _kept_baseline] if "ko" in langs else []
    baselines = [b for b in baselines if any(b(n, models) for n in models)]
    titles = {
        _calibration_baseline: "ko gap closed vs same-calibration AWQ",
        _kept_baseline: "ko gap closed by the kept neurons (vs the same method without)",
    }
    head += [titles[b] for b in baselines]
    lines = ["| checkpoint | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for name, results in models.items():
        cells = [_ppl_cell(results[lang], name == ref) for lang in langs]
        kl = [results[lang]["kl"] for lang in langs]
        top1 = [results[lang]["top1"] for lang in langs]
        if name == ref:
            cells += [""] * (len(head) - len(cells))
        else:
            if wide:
                cells += [number(x, 3) for x in kl] + [percent(x) for x in top1]
            else:
                cells += [number(sum(kl) / len(kl), 3), percent(sum(top1) / len(top1))]
            for baseline in baselines:
                base = baseline(name, models)
                share = gap_closed(models, name, base, ref, "ko") if base else None
                cells.append("" if share is None else f"{percent(share)} (vs {base})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def judge_win_rate(judge: dict[str, Any] | None, name: str, opponent: str) -> float | None:
    """`name`'s win rate against `opponent` from a judge.json (either order of the pair)."""
    for pair in (judge or {}).get("pairs", []):
        rate = pair["win_rate"]
        if rate is not None and (pair["first"], pair["second"]) == (name, opponent):
            return rate
        if rate is not None and (pair["first"], pair["second"]) == (opponent, name):
            return 1.0 - rate
    return None


# --- the seed paper's table -----------------------------------------------------------------------------


def seed_table(sources: Sources, awq: str, awq_opt: str) -> str:
    """Per method (FP, AWQ, AWQ-opt): quality on the first eval group holding both checkpoints (and the
    mean perplexity change over every other such group's languages), judge win rate vs AWQ (when judged),
    engine decode tok/s at batch 1, served output tok/s at the lowest and highest concurrency, checkpoint
    weights and the serving process's peak RSS."""
    eval_names = {"fp": None, "awq": awq, "awq-opt": awq_opt}
    holding = [g for g in eval_groups(sources.evals) if {awq, awq_opt} <= set(g["models"])]
    group = holding[0] if holding else None
    if group is None:
        raise UserError(f"no eval results hold both {awq!r} and {awq_opt!r} (files: {sources.evals})")
    eval_names["fp"] = group["reference"]
    langs, models = group["langs"], group["models"]
    others = holding[1:]
    judge = _load(sources.judge)
    speed, serve = _load(sources.speed), _load(sources.serve)
    speed_rows = {r["method"]: r for r in (speed or {}).get("rows", []) if r["model"] == "gemma3-270m"}
    cells = {}
    if serve:
        from lape_awq.bench.serve_matrix import aggregate

        cells = {(c["config"], c["concurrency"]): c for c in aggregate(serve)}
        levels = serve["settings"]["concurrency"]
        low, high = min(levels), max(levels)
        configs = {e["name"]: e for e in serve["configs"] if e["status"] == "ok"}
    head = [f"{lang} ppl (vs FP)" for lang in langs] + ["KL ko", "top-1 ko"]
    head += [f"{', '.join(g['langs'])}: mean ppl vs FP" for g in others]
    head += ["judge win rate vs AWQ"] if judge else []
    head += ["engine decode tok/s (b1)"] if speed else []
    head += (
        [
            f"served out tok/s ({low} client{'s' * (low > 1)})",
            f"served out tok/s ({high} clients)",
            "checkpoint MiB",
            "peak RSS MiB",
        ]
        if serve
        else []
    )
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for method, name in eval_names.items():
        results = models[name]
        row = [_ppl_cell(results[lang], method == "fp") for lang in langs]
        row += (
            ["", ""] if method == "fp" else [number(results["ko"]["kl"], 3), percent(results["ko"]["top1"])]
        )
        for other in others:
            changes = [other["models"][name][lang]["ppl_change_pct"] for lang in other["langs"]]
            row.append("" if method == "fp" else change(sum(changes) / len(changes)))
        if judge:
            rate = None if method == "awq" else judge_win_rate(judge, name, awq)
            row.append("" if rate is None else percent(rate))
        if speed:
            row.append(number(speed_rows.get(SPEED_METHODS[method], {}).get("decode_tok_s_b1")))
        if serve:
            config = SERVE_CONFIGS[method]
            row += [number((cells.get((config, c)) or {}).get("output_throughput")) for c in (low, high)]
            entry = configs.get(config)
            row += [
                number(entry["weight_bytes"] / MiB) if entry else "-",
                number(entry["memory"]["peak_rss"] / MiB) if entry else "-",
            ]
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# --- the README's Results section -----------------------------------------------------------------------


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _link(path: Path, base: Path) -> str:
    return f"[`{_rel(path, base)}`]({_rel(path, base)})"


def _stamp(record: dict[str, Any]) -> str:
    machine = record["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['cores']} cores"
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "vllm") if machine.get(k))
    return f"{where}, {versions}; {record['date'][:10]}, commit {record['commit']}"


def pipeline_table(record: dict[str, Any]) -> str:
    """The offline pipeline's stages: how long each took and what it did."""
    calibration = record["calibration"]
    lape = (
        f"{record['lape_tokens']:,} tokens at {number(record['lape_tokens_per_second'], 0)} tokens/s; "
        f"{record['korean_neurons']} Korean neurons"
    )
    sizes = record["sizes"]
    quantize = (
        f"{calibration['samples']} x {calibration['seqlen']} calibration tokens; "
        f"sparse part {percent(sizes['sparse_fraction'], 3)} of the rest"
    )
    vocab = record.get("vocab")
    if vocab and vocab["bits"] != 16:
        quantize += (
            f"; {vocab['bits']}-bit vocabulary, kept-row budget {vocab['max_rows']:,} "
            f"({percent(sizes['kept_rows_fraction'], 2)} of the rest); "
            f"checkpoint {number(sizes['total_bytes'] / MiB)} MiB"
        )
    stages = [
        (f"LAPE over {len(calibration['langs'])} languages", record["lape_seconds"], lape),
        (f"{record.get('method', 'awq-opt')} quantization", record["quantize_seconds"], quantize),
        ("whole pipeline", record["total_seconds"], f"target <= {number(record['target_seconds'], 0)} s"),
    ]
    lines = ["| stage | time | detail |", "|---|---:|---|"]
    lines += [f"| {stage} | {number(seconds)} s | {detail} |" for stage, seconds, detail in stages]
    return "\n".join(lines)


QUALITY_NOTE = """\
Reproduce: `bash bench/quality_matrix.sh`. Perplexity on held-out text, KL(FP || Q) in nats per token,
top-1 agreement with FP. Names: method (`awq`, `gptq`, `awq-gptq`; `-opt`: with kept neurons), then the
vocabulary (`v4`, `v8`: 4 / 8 bits, AWQ-opt's with the default 2,048 Korean rows kept; none: FP16), then
calibration (`en`: English only, as in the AWQ paper; `mix8`: the 8 languages, the default; `c64`, `c128`:
64 or 128 sequences instead of 16; `ko2`: Korean tokens weigh 2 in the objectives); `ao`: GPTQ with
act-order; `qi`: each layer calibrated on its quantized predecessors' outputs; `gs`: GPTQ's grids
searched (each group's range shrunk where that lowers the expected error); `random`: as many
random neurons as LAPE found (the control); `top4`: LAPE top-rate 0.04; `sens`: as many neurons, the
most sensitive on Korean text (no LAPE); `lsens`: the most sensitive of the `top4` candidates. Tables merge
the evals of every dated run on the same texts."""
VOCAB_NOTE = """\
Reproduce: `lape-awq bench vocab`. The default model with its decoder in float and only its vocabulary (the
tied embedding / LM head) quantized, so the table isolates the vocabulary: perplexity change against float,
KL in nats per token and top-1 agreement on held-out text, the vocabulary's bytes (codes, scales, zero points,
kept rows), and the share of the plain 4-bit vocabulary's Korean loss the kept rows recover. Kept rows come
from the built-in corpus's fit text only. Rules: `text+script` (default) the language's tokens by frequency
in its fit text, then its script's other tokens by tokenizer rank; `script only` its script's tokens by
tokenizer rank; `pooled` the most frequent tokens of the 8 languages together."""
SPEED_NOTE = """\
Reproduce: `lape-awq bench engine` (run it alone). Decode: 64 new tokens after 32-token
prompts at batch 1 and 16; prefill: 8 x 256 tokens; medians of interleaved rounds. RTN checkpoints (speed
does not depend on how the codes were chosen), AWQ-opt with 0.25% random kept neurons per MLP. Ratios are
to FP of the same model; the spread of each median's rounds is in the JSON (`_min`, `_max`). The llama.cpp
row is `llama-batched-bench` (`make install-peers`) on the GGUF the default model comes from, on the same
shapes, with as many threads as vLLM, rated the same way (tokens / (prefill + decode time))."""
SERVE_NOTE = """\
Reproduce: `lape-awq bench serve` (run it alone; `make install-peers` first for llama.cpp). One server
process per configuration: `lape-awq serve`, or a peer (stock `vllm serve` on our AWQ-opt checkpoint with
the same engine options, llama.cpp's `llama-server` on the GGUF with one slot per client); only the one
measured runs (the others are paused). {repeats} rounds of closed-loop streaming load, {duration:.0f} s per
cell, {max_tokens} tokens per answer, Korean and English chat prompts, the same client for every server.
Cells are means over rounds, spread is (max - min) / mean of the output throughput, ratios are to
`{baseline}`; the peer table is ours / peer. Checkpoint: its safetensors files (llama.cpp: the GGUF); RSS:
summed over the server's process tree."""
NO_GPU_NOTE = """\
Not yet measured: no GPU has run `lape-awq bench kernels` for this project, so the kernels' speed targets
(M = 1 at >= 70% of the card's memory bandwidth and >= 2.5x FP16 cuBLAS, prefill within 1.3x of cuBLAS)
are unverified."""


def results_section(sources: Sources, base: Path, awq: str, awq_opt: str) -> str:
    """The README's Results section: every table generated from `sources`, with where each came from
    (machine, date, commit) and the command that reproduces it. Links are relative to `base`."""
    from lape_awq.bench.serve_matrix import markdown_tables
    from lape_awq.bench.vllm_speed import markdown_table

    speed, serve, pipeline = _load(sources.speed), _load(sources.serve), _load(sources.pipeline)
    vocab = _load(sources.vocab)
    origin = [f"quality {', '.join(_link(p, base) for p in sources.evals)}"]
    origin += [f"judge {_link(sources.judge, base)}"] if sources.judge else []
    origin += [f"engine speed {_link(sources.speed, base)}"] if speed else []
    origin += [f"serving {_link(sources.serve, base)}"] if serve else []
    parts = [
        "## Results",
        "",
        "_Generated by `lape-awq bench report --readme README.md` from the newest files in `bench/results/`;",
        "do not edit between the markers._",
        "",
        "### FP vs AWQ vs AWQ-opt on the default model (Gemma 3 270M)",
        "",
        f"From: {'; '.join(origin)}. AWQ is `{awq}` and AWQ-opt `{awq_opt}` (the default recipe) of",
        "`bench/quality_matrix.sh`, the same recipe as the default checkpoints whose served throughput and",
        "memory are shown; engine decode is measured on RTN checkpoints of the same model with 0.25% random",
        "kept neurons (speed does not depend on the codes).",
        "",
        seed_table(sources, awq, awq_opt),
        "",
        "### Quality of every recipe",
        "",
        QUALITY_NOTE,
    ]
    for group in eval_groups(sources.evals):
        files = ", ".join(_link(p, base) for p in group["files"])
        head = f"{', '.join(group['langs'])}: first {group['max_tokens']:,} held-out tokens per language"
        parts += ["", f"{head} ({files})", "", quality_table(group)]
    if vocab:
        from lape_awq.bench.vocab_quality import markdown_table as vocab_table

        parts += [
            "",
            "### The quantized vocabulary alone",
            "",
            f"{_link(sources.vocab, base)} ({_stamp(vocab)}).",
            VOCAB_NOTE,
            "",
            vocab_table(vocab).rstrip(),
        ]
    if speed:
        parts += [
            "",
            "### vLLM engine speed and weight memory",
            "",
            f"{_link(sources.speed, base)} ({_stamp(speed)}).",
            SPEED_NOTE,
            "",
            markdown_table(speed).rstrip(),
        ]
    if serve:
        parts += [
            "",
            "### Serving matrix",
            "",
            f"{_link(sources.serve, base)} ({_stamp(serve)}).",
            SERVE_NOTE.format(**serve["settings"]),
            "",
            markdown_tables(serve).rstrip(),
            "",
            f"![serving matrix]({_rel(sources.serve.with_suffix('.png'), base)})",
        ]
        gguf = _load(sources.gguf)
        if gguf:
            from lape_awq.bench.gguf_agreement import markdown_table as gguf_table

            parts += [
                "",
                "llama.cpp's quality is our FP row's (the default model is its GGUF dequantized); on a "
                "sample, "
                f"{_link(sources.gguf, base)} ({_stamp(gguf)}, `lape-awq bench gguf`): llama-server's "
                f"next-token log-probabilities (its top {gguf['settings']['top']}) against our float model's "
                f"at the end of {gguf['settings']['window_tokens']}-token held-out windows.",
                "",
                gguf_table(gguf).rstrip(),
            ]
    if pipeline:
        parts += [
            "",
            "### Offline pipeline",
            "",
            f"{_link(sources.pipeline, base)} ({_stamp(pipeline)}). Reproduce: `lape-awq bench pipeline`.",
            "",
            pipeline_table(pipeline),
        ]
    for path in sources.pipeline_recipes:
        recipe = json.loads(path.read_text())
        parts += [
            "",
            f"Another recipe, `lape-awq quantize {recipe['quantize_options']}`: {_link(path, base)} "
            f"({_stamp(recipe)}).",
            "",
            pipeline_table(recipe),
        ]
    parts += ["", "### GPU kernels", ""]
    if sources.kernels:
        parts += [
            f"{_link(sources.kernels, base)}. Reproduce: `lape-awq bench kernels` on the card.",
            "",
            sources.kernels.read_text().split("\n", 2)[-1].rstrip(),
        ]
    else:
        parts.append(NO_GPU_NOTE)
    return "\n".join(parts) + "\n"


def replace_results(readme: str, section: str) -> str:
    """`readme` with the text between the results markers replaced by `section`."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise UserError(f"the README has no {BEGIN} ... {END} block to fill")
    return readme[: start + len(BEGIN)] + "\n" + section + readme[end:]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    parser.add_argument("--awq", default=DEFAULT_AWQ, help="eval name of the AWQ checkpoint")
    parser.add_argument("--awq-opt", default=DEFAULT_AWQ_OPT, help="eval name of the AWQ-opt checkpoint")
    parser.add_argument("--readme", type=Path, help="README whose Results section is regenerated")
    parser.add_argument("--out", type=Path, help="where report_<date>.md goes (default: --results)")


def run(args: argparse.Namespace) -> int:
    """Write report_<date>.md (and the README's Results section with --readme)."""
    sources = find_sources(args.results)
    if not sources.evals:
        raise UserError(f"no quality_<date>/ folder with eval results in {args.results}")
    out = args.out or args.results
    table = seed_table(sources, args.awq, args.awq_opt)
    origin = ", ".join(
        _link(p, out) for p in [*sources.evals, sources.judge, sources.speed, sources.serve] if p
    )
    path = write_atomic(
        out / f"report_{datetime.date.today().isoformat()}.md",
        f"# FP vs AWQ vs AWQ-opt\n\nFrom: {origin}\n\n{table}\n",
    )
    print(table)
    print(f"wrote {path}")
    if args.readme:
        section = results_section(sources, args.readme.parent, args.awq, args.awq_opt)
        write_atomic(args.readme, replace_results(args.readme.read_text(), section))
        print(f"updated the Results section of {args.readme}")
    return 0
