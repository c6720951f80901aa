"""LAPE throughput on a model (default: the embedded Gemma 3 270M): tokens/s, wall time, and the time
projected for the target workload of 8 languages x 30k tokens (target: 5 minutes). Writes
bench/results/lape_speed_<date>_<dtype>_s<seq-len>_b<batch-size>.json.

    lape-awq bench lape [--model PATH] [--dtype auto] [--tokens N] [--seq-len N] [--batch-size N] ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lape_awq.bench.run_info import result_header, write_json
from lape_awq.quant.cli.arguments import add_model_argument, add_sampling_arguments
from lape_awq.quant.lape.finder import SamplingSettings, find_language_neurons
from lape_awq.quant.lape.selection import LapeOptions
from lape_awq.quant.model_loading import load_causal_lm, pick_dtype, resolve_model_dir
from lape_awq.quant.text_sources import DEFAULT_LANGUAGES, language_texts

TARGET_TOKENS = 8 * 30_000
TARGET_SECONDS = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where fast), float32, bfloat16, float16")
    add_sampling_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")


def run(args: argparse.Namespace) -> int:
    """Run LAPE once, timed; prints the record and writes it under --out."""
    model_dir = resolve_model_dir(args.model)
    dtype = pick_dtype(args.dtype)
    load_start = time.perf_counter()
    model, tokenizer = load_causal_lm(model_dir, dtype)
    load_seconds = time.perf_counter() - load_start
    texts = language_texts(list(DEFAULT_LANGUAGES), {})
    sampling = SamplingSettings(args.tokens, args.seq_len, args.batch_size, args.seed)
    start = time.perf_counter()
    result = find_language_neurons(model, tokenizer, texts, LapeOptions(), sampling)
    seconds = time.perf_counter() - start
    tokens = int(result.tokens.sum())
    rate = tokens / seconds
    record = {
        **result_header("lape_speed"),
        "model": str(model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "sampling": vars(sampling),
        "tokens_per_language": dict(zip(result.languages, result.tokens.tolist(), strict=True)),
        "tokens": tokens,
        "load_seconds": round(load_seconds, 2),
        "lape_seconds": round(seconds, 2),
        "tokens_per_second": round(rate, 1),
        "projected_seconds_8x30k": round(TARGET_TOKENS / rate, 1),
        "target_seconds_8x30k": TARGET_SECONDS,
        "korean_neurons": int(result.selection.language_mask[result.languages.index("ko")].sum()),
    }
    name = f"lape_speed_{record['date'][:10]}_{record['dtype']}_s{args.seq_len}_b{args.batch_size}.json"
    path = write_json(args.out / name, record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
