"""Whole pipeline on the default model (LAPE neurons, then quantization with kept neurons: the default
recipe, AWQ-opt with its 4-bit vocabulary and kept Korean rows, unless the recipe options say otherwise),
timed stage by stage; target <= 10 minutes on the 2-core CPU. Writes
bench/results/pipeline_speed_<date>[_<tag>].json (the README's "Offline pipeline" table).

    lape-awq bench pipeline [--model PATH] [--method gptq-opt --calib-samples 64 ...] [--tag T] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from lape_awq.bench.run_info import result_header, write_json
from lape_awq.quant.awq.pipeline import KeepSpec, quantize_checkpoint
from lape_awq.quant.awq.quantizer import QuantSpec
from lape_awq.quant.calibration import CalibrationSpec
from lape_awq.quant.cli.arguments import add_model_argument, language_weights
from lape_awq.quant.cli.quantize_command import CLI_METHODS
from lape_awq.quant.lape.job import find_and_save_neurons
from lape_awq.quant.model_loading import resolve_model_dir
from lape_awq.quant.vocab.quantizer import default_vocab

TARGET_SECONDS = 600.0
OPT_METHODS = tuple(m for m in CLI_METHODS if m.endswith("-opt"))  # the pipeline finds neurons to keep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    calib = CalibrationSpec()
    parser.add_argument("--method", choices=OPT_METHODS, default="awq-opt", help="the quantization method")
    parser.add_argument("--calib-samples", type=int, default=calib.samples)
    parser.add_argument("--calib-weights", type=language_weights, default=(), metavar="LANG=W,...")
    parser.add_argument("--act-order", action="store_true", help="GPTQ's act-order (lape-awq quantize's)")
    parser.add_argument("--quantized-inputs", action="store_true", help="as lape-awq quantize's")
    parser.add_argument("--grid-search", action="store_true", help="as lape-awq quantize's")
    parser.add_argument("--tag", help="a side run: pipeline_speed_<date>_<tag>.json")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")


def _recipe(args: argparse.Namespace) -> tuple[QuantSpec, CalibrationSpec, str]:
    """The recipe the options name, and the `lape-awq quantize` options that make the same checkpoint."""
    spec = QuantSpec(
        args.method.removesuffix("-opt"),
        act_order=args.act_order,
        quantized_inputs=args.quantized_inputs,
        grid_search=args.grid_search,
    )
    calib = replace(CalibrationSpec(), samples=args.calib_samples, weights=tuple(args.calib_weights))
    options = [f"--method {args.method}"]
    if calib.samples != CalibrationSpec.samples:
        options.append(f"--calib-samples {calib.samples}")
    if calib.weights:
        options.append("--calib-weights " + ",".join(f"{lang}={w:g}" for lang, w in calib.weights))
    flags = {
        "--act-order": spec.act_order,
        "--quantized-inputs": spec.quantized_inputs,
        "--grid-search": spec.grid_search,
    }
    options += [flag for flag, on in flags.items() if on]
    return spec, calib, " ".join(options)


def run(args: argparse.Namespace) -> int:
    """Find the neurons, then quantize, both into a temp folder; prints the record, writes it under --out."""
    spec, calib, options = _recipe(args)  # bad options fail before the long stages
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
            spec,
            calib,
            keep,
            vocab=default_vocab(keep.langs),
        )
        quant_total = time.perf_counter() - quant_started
    total = time.perf_counter() - started
    record = {
        **result_header("pipeline_speed"),
        "model": str(model_dir),
        "method": args.method,
        "quant_spec": spec.record(),
        "quantize_options": options,
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
    tag = f"_{args.tag}" if args.tag else ""
    path = write_json(args.out / f"pipeline_speed_{record['date'][:10]}{tag}.json", record)
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
