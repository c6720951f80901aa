"""llama.cpp on the GGUF against our FP model: the same weights, so the same quality?

The default model's float weights are the GGUF (Q4_K_M) dequantized, so the serving matrix's llama.cpp peer
has our FP row's quality. This checks it on a sample: windows of held-out text per language (never used
for LAPE or calibration), and at each window's end the next-token distribution llama.cpp's llama-server
reports (`/completion` with `n_probs`: the top tokens' log-probabilities of its own logits) against our
float model's log-softmax at the same position. Reported per language: top-1 agreement, the largest and
mean absolute log-probability gap over llama.cpp's top tokens, and the total probability of those tokens
under each.

Writes bench/results/gguf_agreement_<date>.{json,md}.

    lape-awq bench gguf [--langs ko,en] [--windows 32] [--window-tokens 128]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from lape_awq.bench.formatting import number, percent
from lape_awq.bench.peers import ServerOptions, start_server
from lape_awq.bench.run_info import result_header, write_json
from lape_awq.quant.cli.arguments import csv_list
from lape_awq.quant.errors import UserError
from lape_awq.quant.file_io import write_atomic

TOP = 10  # llama.cpp's top tokens compared per position


def windows(tokenizer: Any, lang: str, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens of `lang`'s held-out text, <bos> first."""
    from lape_awq.quant.text_sources import builtin_text
    from lape_awq.quant.token_streams import token_stream

    ids = token_stream(tokenizer, builtin_text(lang, "heldout"), count * length * 4, seed)
    if len(ids) < length + 1:
        raise UserError(f"the {lang} held-out text has fewer than {length} tokens")
    rng = random.Random(seed)
    starts = [rng.randrange(len(ids) - length) for _ in range(count)]
    return [[tokenizer.bos_token_id, *ids[s : s + length]] for s in starts]


def llama_top(root: str, prompt: list[int]) -> list[tuple[int, float]]:
    """llama-server's top-TOP (token id, log-probability) for the token after `prompt`."""
    body = {"prompt": prompt, "n_predict": 1, "n_probs": TOP, "temperature": 0.0, "cache_prompt": False}
    response = httpx.post(f"{root}/completion", json=body, timeout=120)
    response.raise_for_status()
    answer = response.json()
    if answer.get("tokens_evaluated") != len(prompt):
        raise RuntimeError(f"llama-server evaluated {answer.get('tokens_evaluated')} of {len(prompt)} tokens")
    top = answer["completion_probabilities"][0]["top_logprobs"]
    return [(entry["id"], entry["logprob"]) for entry in top]


@torch.no_grad()
def compare(model: torch.nn.Module, root: str, prompts: list[list[int]]) -> dict[str, Any]:
    """Per-position comparison of llama.cpp's top tokens with our model's log-softmax, summarised."""
    gaps, top1, mass_llama, mass_ours = [], [], [], []
    for prompt in prompts:
        theirs = llama_top(root, prompt)
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
        ours = torch.log_softmax(logits, -1)
        ids = [token for token, _ in theirs]
        gap = np.abs(np.array([lp for _, lp in theirs]) - ours[ids].numpy())
        gaps.append(gap)
        top1.append(int(ours.argmax()) == ids[0])
        mass_llama.append(float(np.exp([lp for _, lp in theirs]).sum()))
        mass_ours.append(float(ours[ids].exp().sum()))
    every = np.concatenate(gaps)
    return {
        "positions": len(prompts),
        "top1_agreement": float(np.mean(top1)),
        "max_abs_logprob_gap": float(every.max()),
        "mean_abs_logprob_gap": float(every.mean()),
        "top1_abs_logprob_gap_mean": float(np.mean([g[0] for g in gaps])),
        "top_mass_llama_cpp": float(np.mean(mass_llama)),
        "top_mass_ours": float(np.mean(mass_ours)),
    }


def markdown_table(record: dict[str, Any]) -> str:
    lines = [
        f"| language | positions | top-1 agreement | mean abs log-prob gap (top {TOP}) | max gap "
        f"| top-{TOP} mass llama.cpp / ours |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for lang, r in record["languages"].items():
        lines.append(
            f"| {lang} | {r['positions']} | {percent(r['top1_agreement'])} | "
            f"{number(r['mean_abs_logprob_gap'], 4)} | {number(r['max_abs_logprob_gap'], 4)} | "
            f"{number(r['top_mass_llama_cpp'], 3)} / {number(r['top_mass_ours'], 3)} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--langs", type=csv_list, default=["ko", "en"], help="held-out text languages")
    parser.add_argument("--windows", type=int, default=32, help="positions compared per language")
    parser.add_argument("--window-tokens", type=int, default=128, help="context tokens before each position")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--llama-server", type=Path, help="llama-server binary (default: make install-peers')"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")


def run(args: argparse.Namespace) -> int:
    """Start llama-server on the default GGUF, compare, write JSON and markdown."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lape_awq.quant.default_model import default_gguf, prepare_default_model

    if args.windows < 1 or args.window_tokens < 1:
        raise UserError("--windows and --window-tokens must be >= 1")
    model_dir, gguf = prepare_default_model(), default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    options = ServerOptions(
        max_num_seqs=1, max_model_len=args.window_tokens + 8, llama_server=args.llama_server
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="lape-awq-gguf-") as tmp:
        server = start_server("llama.cpp", "gguf", gguf, "auto", options, Path(tmp) / "llama-server.log")
        try:
            reason = server.wait_ready(300)
            if reason is not None:
                raise UserError(f"llama-server did not start: {reason}")
            for lang in args.langs:
                prompts = windows(tokenizer, lang, args.windows, args.window_tokens, args.seed)
                results[lang] = compare(model, server.root, prompts)
                print(f"{lang}: {results[lang]}", flush=True)
        finally:
            server.stop()
    record = {
        **result_header("gguf_agreement"),
        "gguf": gguf.name,
        "settings": {"windows": args.windows, "window_tokens": args.window_tokens, "top": TOP},
        "languages": results,
    }
    path = write_json(args.out / f"gguf_agreement_{record['date'][:10]}.json", record)
    write_atomic(path.with_suffix(".md"), markdown_table(record))
    print(markdown_table(record))
    print(f"wrote {path} and its .md table")
    return 0
