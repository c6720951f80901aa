"""Whole AWQ-opt pipeline on the default model (LAPE neurons, then AWQ-opt quantization with the
default recipe), timed stage by stage; target <= 10 minutes on the 2-core CPU. Writes a JSON result.

    python -m lape_awq.bench.pipeline_speed [--model PATH] [--out bench/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

from lape_awq.bench.run_info import git_commit, machine
from lape_awq.quant.calibration import CalibrationSpec
from lape_awq.quant.commands import add_model_argument
from lape_awq.quant.model_loading import resolve_model_dir
from lape_awq.quant.neurons_job import find_and_save_neurons
from lape_awq.quant.pipeline import KeepSpec, quantize_checkpoint
from lape_awq.quant.quantizer import QuantSpec

TARGET_SECONDS = 600.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_argument(parser)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        nf, lape_seconds = find_and_save_neurons(model_dir, Path(tmp) / "neurons.safetensors")
        lape_total = time.perf_counter() - started
        quant_started = time.perf_counter()
        manifest = quantize_checkpoint(
            model_dir,
            Path(tmp) / "ckpt",
            QuantSpec(),
            CalibrationSpec(),
            KeepSpec(Path(tmp) / "neurons.safetensors"),
        )
        quant_total = time.perf_counter() - quant_started
    total = time.perf_counter() - started
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {
        "benchmark": "pipeline_speed",
        "date": date,
        "commit": git_commit(),
        "machine": machine(),
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
        "sizes": manifest["sizes"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline_speed_{date[:10]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
