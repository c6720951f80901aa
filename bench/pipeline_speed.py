"""Whole AWQ-opt pipeline on the default model (LAPE neurons, then AWQ-opt quantization with the
default recipe, its 4-bit vocabulary and kept Korean rows included), timed stage by stage; target <= 10
minutes on the 2-core CPU. Writes
bench/results/pipeline_speed_<date>.json (the README's "Offline pipeline" table).

    lape-awq bench pipeline [--model PATH] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lape_awq.bench.run_info import result_header, write_json
from lape_awq.quant.awq.pipeline import KeepSpec, quantize_checkpoint
from lape_awq.quant.awq.quantizer import QuantSpec
from lape_awq.quant.calibration import CalibrationSpec
from lape_awq.quant.cli.arguments import add_model_argument
from lape_awq.quant.lape.job import find_and_save_neurons
from lape_awq.quant.model_loading import resolve_model_dir
from lape_awq.quant.vocab.quantizer import default_vocab

TARGET_SECONDS = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")


def run(args: argparse.Namespace) -> int:
    """Find the neurons, then quantize, both into a temp folder; prints the record, writes it under --out."""
    model_dir = resolve_model_dir(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        nf, lape_seconds = find_and_save_neurons(model_dir, Path(tmp) / "neurons.safetensors")
        lape_total = time.perf_counter() - started
        quant_started = time.perf_counter()
        keep = KeepSpec(Path(tmp) / "neurons.safetensors")
        manifest = quantize_checkpoint(
            model_dir,
            Path(tmp) / "ckpt",
            QuantSpec(),
            CalibrationSpec(),
            keep,
            vocab=default_vocab(keep.langs),
        )
        quant_total = time.perf_counter() - quant_started
    total = time.perf_counter() - started
    record = {
        **result_header("pipeline_speed"),
        "model": str(model_dir),
        "calibration": manifest["calibration"],
        "lape_tokens": int(nf.tokens.sum()),
        "lape_seconds": round(lape_seconds, 1),
        "lape_tokens_per_second": round(int(nf.tokens.sum()) / lape_seconds, 1),
        "korean_neurons": int(nf.mask("ko").sum()),
        "neurons_stage_seconds": round(lape_total, 1),
        "quantize_seconds": manifest["quantize_seconds"],
        "quantize_stage_seconds": round(quant_total, 1),
        "total_seconds": round(total, 1),
        "target_seconds": TARGET_SECONDS,
        "vocab": manifest["vocab_spec"],
        "sizes": manifest["sizes"],
    }
    path = write_json(args.out / f"pipeline_speed_{record['date'][:10]}.json", record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
