"""vLLM engine speed and weight memory: FP vs our AWQ vs our AWQ-opt vs stock vLLM AWQ, and the vocabulary
in FP16 / 8 / 4 bits, in one run.

Two models: the embedded default (Gemma 3 270M, float32 as vLLM needs on CPU; stock AWQ cannot run it
there: it needs fp16/bf16, which Gemma 3 refuses / this CPU's bf16 path crashes) and a Llama-shaped model
with random weights, large enough that decode streams the weights (float16, vocabulary 32k, untied). Speed
does not depend on how the codes were chosen, so the checkpoints here are RTN-quantized (seconds instead
of minutes of AWQ search); AWQ-opt keeps 0.25% random neurons per MLP, about the default model's 0.21%,
and, like the default recipe, DEFAULT_KEPT_ROWS random vocabulary rows. `our awq` and `our awq-opt` are
the default recipe's vocabulary (4 bits); `fp16 vocab` is the vocabulary AutoAWQ leaves (and lape-awq kept
before quantizing it).

The default model also gets a llama.cpp row: `llama-batched-bench` (bench/install_llama_cpp.sh) on the GGUF
it was converted from, with as many threads as vLLM uses, on the same workload shapes and rates (tokens
over prefill + decode time); reported as skipped, with how to install it, where llama.cpp is missing.

Writes bench/results/vllm_speed_<date>.{json,md}: every engine's rates (median, min and max over the
rounds) and held weight bytes, and the README's table.

    lape-awq bench engine [--out bench/results]     (run it alone: it uses every core)
    lape-awq bench engine --table bench/results/vllm_speed_<date>.json     (only print the table)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lape_awq.bench.formatting import MiB, number, ratio
from lape_awq.bench.peers import PeerMissing, llama_cpp_tool
from lape_awq.bench.run_info import result_header, write_json
from lape_awq.quant.file_io import write_atomic
from lape_awq.quant.vocab.quantizer import DEFAULT_BITS, DEFAULT_KEPT_ROWS

NEW_TOKENS = 64
PROMPT_TOKENS = 32
PREFILL_PROMPTS, PREFILL_TOKENS = 8, 256
KEPT_FRACTION = 0.0025
REPEATS = 3  # each rate is the median of this many interleaved rounds (min and max kept too)
# workload -> (sequences, prompt tokens, new tokens); prefill generates one token and counts the prompt
WORKLOADS = {
    "decode_tok_s_b1": (1, PROMPT_TOKENS, NEW_TOKENS),
    "decode_tok_s_b16": (16, PROMPT_TOKENS, NEW_TOKENS),
    "prefill_tok_s": (PREFILL_PROMPTS, PREFILL_TOKENS, 1),
}
WORKLOAD_LABELS = {
    "decode_tok_s_b1": "decode b1",
    "decode_tok_s_b16": "decode b16",
    "prefill_tok_s": "prefill",
}
LLAMA_SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


# Checkpoint -> (random kept neurons, vocabulary bits or None for FP16, kept vocabulary rows).
CHECKPOINTS = {
    "awq-fp16-vocab": (False, None, False),
    "awq-8bit-vocab": (False, 8, False),
    "awq": (False, DEFAULT_BITS, False),
    "awq-opt": (True, DEFAULT_BITS, True),
}
VOCAB_LABELS = {None: "fp16", 8: "8-bit", 4: "4-bit"}
LLAMA_CPP = "llama.cpp"  # a plan's quantization for the GGUF row, run by llama.cpp instead of vLLM


def write_checkpoints(
    model: torch.nn.Module, tokenizer, root: Path, seed: int, names: tuple[str, ...]
) -> dict[str, Path]:
    """FP (the float model itself) and the named CHECKPOINTS, all RTN g128."""
    from lape_awq.quant.architectures import decoder_layers
    from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
    from lape_awq.quant.checkpoint.layout import vocab_modules
    from lape_awq.quant.checkpoint.writer import write_checkpoint
    from lape_awq.quant.lape.kept_neurons import random_like
    from lape_awq.quant.vocab.quantizer import VocabSpec, quantize_vocab, vocab_section

    layers = decoder_layers(model)
    inter = model.config.intermediate_size
    k = max(1, round(KEPT_FRACTION * inter))
    kept = random_like([torch.empty(k)] * len(layers), inter, seed)
    vocab_size = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    kept_rows = torch.randperm(vocab_size, generator=gen)[:DEFAULT_KEPT_ROWS].sort().values
    paths = {"fp": root / "fp"}
    model.save_pretrained(paths["fp"])
    tokenizer.save_pretrained(paths["fp"])
    for name in names:
        with_neurons, bits, with_rows = CHECKPOINTS[name]
        keep = kept if with_neurons else None
        vocab = {}
        if bits is not None:
            rows = kept_rows if with_rows else None
            spec = VocabSpec(bits, keep_langs=("random",) if with_rows else (), max_rows=len(kept_rows))
            matrices = {  # no clipping search: speed does not depend on the codes
                m: quantize_vocab(model.get_submodule(m).weight, spec, rows, clip=False)
                for m in vocab_modules(model.config)
            }
            vocab = {"vocab": matrices, "vocab_section": vocab_section(spec, rows, "random")}
        quantized = quantize_model(model, None, QuantSpec("rtn"), kept=keep, progress=False)
        sparse = None
        if keep is not None:
            sparse = {
                "languages": [],
                "selection": "random",
                "dtype": "float16",
                "projections": ["gate_proj", "up_proj", "down_proj"],
                "neurons_per_layer": [len(x) for x in keep],
            }
        paths[name] = root / name
        manifest = {"method": f"bench-{name}"}
        write_checkpoint(paths[name], model, tokenizer, quantized, 128, sparse, manifest, **vocab)
    return paths


def held_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights the engine holds: its parameters, plus the dense linears vLLM's CPU path moved
    into a oneDNN/sgl handle (it leaves an empty `weight` behind). Buffers such as rotary tables are not
    weights (Gemma 3's come to 67 MB in fp32) and are left out."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() == 0:
            rows, cols = module.output_size_per_partition, module.input_size_per_partition
            total += rows * cols * weight.element_size()
    return total


class Engine:
    """One vLLM engine and its measurements; several live side by side so their runs can interleave."""

    def __init__(self, path: Path, dtype: str, quantization: str | None, skip_tokenizer: bool):
        from vllm import LLM

        self.llm = LLM(
            model=str(path),
            dtype=dtype,
            quantization=quantization,
            max_model_len=1024,
            enforce_eager=False,
            skip_tokenizer_init=skip_tokenizer,
            seed=0,
            enable_prefix_caching=False,
        )
        self.samples: dict[str, list[float]] = {name: [] for name in WORKLOADS}
        self.rate("decode_tok_s_b1", warm_up=True)  # compilation, caches

    def rate(self, workload: str, warm_up: bool = False) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        count, length, new_tokens = WORKLOADS[workload]
        gen = torch.Generator().manual_seed(len(self.samples[workload]))
        batch = [
            TokensPrompt(prompt_token_ids=torch.randint(10, 30000, (length,), generator=gen).tolist())
            for _ in range(count)
        ]
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        self.llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if not warm_up:  # decode counts generated tokens, prefill counts prompt tokens
            self.samples[workload].append(count * (new_tokens if new_tokens > 1 else length) / seconds)

    @staticmethod
    def medians(samples: dict[str, list[float]]) -> dict[str, float]:
        """Per workload: the median rate, with its min and max."""
        out: dict[str, float] = {}
        for name, values in samples.items():
            ordered = sorted(values)
            out |= {name: ordered[len(ordered) // 2], f"{name}_min": ordered[0], f"{name}_max": ordered[-1]}
        return out

    def result(self) -> dict[str, float]:
        out = self.medians(self.samples)
        out["weight_bytes"] = self.llm.apply_model(held_weight_bytes)[0]
        return out


class LlamaCppEngine:
    """llama.cpp on a GGUF through `llama-batched-bench`, one run per measurement, as an Engine: each
    workload's sequences, prompt and new tokens, rated as Engine rates them (tokens / (prefill + decode))."""

    def __init__(self, gguf: Path, binary: Path, threads: int) -> None:
        self.gguf, self.binary, self.threads = gguf, binary, threads
        self.samples: dict[str, list[float]] = {name: [] for name in WORKLOADS}
        self.rate("decode_tok_s_b1", warm_up=True)  # page cache, CPU frequency

    def rate(self, workload: str, warm_up: bool = False) -> None:
        count, length, new_tokens = WORKLOADS[workload]
        context = 1 << (count * (length + new_tokens) * 2 - 1).bit_length()  # room for every sequence
        command = [str(self.binary), "--model", str(self.gguf), "--ctx-size", str(context)]
        command += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        command += [
            "-npp",
            str(length),
            "-ntg",
            str(new_tokens),
            "-npl",
            str(count),
            "--output-format",
            "jsonl",
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"llama-batched-bench failed ({done.returncode}): {done.stderr[-1000:]}")
        row = json.loads(lines[-1])
        if not warm_up:  # decode counts generated tokens, prefill counts prompt tokens
            tokens = count * (new_tokens if new_tokens > 1 else length)
            self.samples[workload].append(tokens / row["t"])

    def result(self) -> dict[str, float]:
        out = Engine.medians(self.samples)
        out["weight_bytes"] = self.gguf.stat().st_size
        return out


def stock_awq_unavailable() -> str | None:
    """Why stock vLLM AWQ cannot run here, or None: on CPU it needs `cpu_gemm_wna16`, which vLLM ships in
    its AVX-512 library only."""
    import torch
    from vllm.platforms import current_platform

    if torch.cuda.is_available():
        return None
    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    return "stock vLLM AWQ on CPU needs cpu_gemm_wna16, which vLLM builds for AVX-512 CPUs only"


def measure_group(plan: list[tuple[str, Path, str, str | None, bool]]) -> list[dict[str, float]]:
    """Start every engine of one model, then REPEATS rounds over them (order reversed every other round),
    so slow phases of a noisy machine hit every method alike; medians per engine. A plan entry whose
    quantization is LLAMA_CPP runs the GGUF at its path in llama.cpp."""
    engines = []
    for method, path, dtype, quantization, skip_tok in plan:
        print(f"  starting {method} ({dtype})", flush=True)
        if quantization == LLAMA_CPP:
            tool = llama_cpp_tool("llama-batched-bench")
            engines.append(LlamaCppEngine(path, tool, len(os.sched_getaffinity(0))))
        else:
            engines.append(Engine(path, dtype, quantization, skip_tok))
    for round_ in range(REPEATS):
        order = engines if round_ % 2 == 0 else engines[::-1]
        for engine in order:
            for workload in WORKLOADS:
                engine.rate(workload)
        print(f"  round {round_ + 1}/{REPEATS} done", flush=True)
    results = [engine.result() for engine in engines]
    del engines
    gc.collect()
    return results


def markdown_table(record: dict) -> str:
    """The README's table: medians, each quantized row with its ratio to FP of the same model; then the
    ratios the targets name (AWQ-opt / AWQ at equal vocabulary bits, the default / FP16-vocabulary AWQ)."""
    columns = {"decode_tok_s_b1": 1, "decode_tok_s_b16": 1, "prefill_tok_s": 1, "weight_bytes": 1 / MiB}
    rows = record["rows"]
    fp = {r["model"]: r for r in rows if r["method"] == "fp"}
    lines = [
        "| model | method | vocabulary | dtype | decode b1 tok/s | decode b16 tok/s | prefill tok/s "
        "| weights MiB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = fp.get(r["model"]) if r["method"] != "fp" else None
        cells = [
            number(r[key] * scale) + (f" ({ratio(r[key] / base[key])})" if base else "")
            for key, scale in columns.items()
        ]
        vocab = r.get("vocab", "fp16" if r["method"] != "fp" else "fp")
        lines.append(f"| {r['model']} | {r['method']} | {vocab} | {r['dtype']} | " + " | ".join(cells) + " |")
    lines.append("")
    by_name = {(r["model"], r["method"]): r for r in rows}
    for model in fp:
        pairs = [
            ("AWQ-opt / AWQ (same vocabulary)", "our awq-opt", "our awq"),
            ("default AWQ / AWQ with fp16 vocabulary", "our awq", "our awq, fp16 vocab"),
            ("our AWQ-opt / llama.cpp on the GGUF", "our awq-opt", "llama.cpp"),
        ]
        for label, top, bottom in pairs:
            a, b = by_name.get((model, top)), by_name.get((model, bottom))
            if a and b:
                shown = ", ".join(f"{name} {ratio(a[k] / b[k])}" for k, name in WORKLOAD_LABELS.items())
                lines.append(f"- {model}, {label}: {shown}")
    for skipped in record.get("skipped", []):
        lines.append(f"- {skipped['model']}, {skipped['method']}: not measured ({skipped['reason']})")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="result folder")
    parser.add_argument("--table", type=Path, help="only print the markdown table of this result file")


def run(args: argparse.Namespace) -> int:
    """Build the checkpoints, measure every engine; prints the table and writes JSON + markdown."""
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())), end="")
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # up to four engines live at once
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: apply_model, less noise
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lape_awq.quant.default_model import prepare_default_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="lape-awq-vllm-speed-") as tmp:
        default_dir = prepare_default_model()
        gemma = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(default_dir)  # the Llama runs without one (token ids only)
        gemma_paths = write_checkpoints(gemma, tokenizer, Path(tmp) / "gemma", 0, tuple(CHECKPOINTS))
        del gemma
        torch.manual_seed(0)
        llama = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_SHAPE), dtype=torch.float32)
        llama_names = ("awq-fp16-vocab", "awq", "awq-opt")
        llama_paths = write_checkpoints(llama, tokenizer, Path(tmp) / "llama", 1, llama_names)
        del llama
        # (method, checkpoint, dtype, --quantization, skip the tokenizer)
        plans = {
            "gemma3-270m": [
                ("fp", "fp", "float32", None, False),
                ("our awq, fp16 vocab", "awq-fp16-vocab", "float32", "lape_awq", False),
                ("our awq, 8-bit vocab", "awq-8bit-vocab", "float32", None, False),
                ("our awq", "awq", "float32", None, False),
                ("our awq-opt", "awq-opt", "float32", None, False),
                ("llama.cpp", "gguf", "Q4_K_M", LLAMA_CPP, False),
            ],
            "llama-0.4b-random": [
                ("fp", "fp", "float16", None, True),
                ("stock vllm awq", "awq-fp16-vocab", "float16", None, True),
                ("our awq, fp16 vocab", "awq-fp16-vocab", "float16", "lape_awq", True),
                ("our awq", "awq", "float16", None, True),
                ("our awq-opt", "awq-opt", "float16", None, True),
            ],
        }
        paths = {"gemma3-270m": gemma_paths, "llama-0.4b-random": llama_paths}
        skipped = []
        try:
            from lape_awq.quant.default_model import default_gguf

            llama_cpp_tool("llama-batched-bench")
            gemma_paths["gguf"] = default_gguf()
        except PeerMissing as missing:
            plans["gemma3-270m"] = [p for p in plans["gemma3-270m"] if p[3] != LLAMA_CPP]
            skipped.append({"model": "gemma3-270m", "method": "llama.cpp", "reason": str(missing)})
            print(f"  llama.cpp row skipped: {missing}", flush=True)
        no_stock_awq = stock_awq_unavailable()
        if no_stock_awq:
            for model, plan in plans.items():
                if any(method == "stock vllm awq" for method, *_ in plan):
                    plans[model] = [p for p in plan if p[0] != "stock vllm awq"]
                    skipped.append({"model": model, "method": "stock vllm awq", "reason": no_stock_awq})
            print(f"  stock vllm awq rows skipped: {no_stock_awq}", flush=True)
        for model, plan in plans.items():
            print(f"{model}: {len(plan)} engines, {REPEATS} rounds", flush=True)
            engines = [(m, paths[model][c], *rest) for m, c, *rest in plan]
            for (method, checkpoint, dtype, _, _), result in zip(plan, measure_group(engines), strict=True):
                vocab = (
                    checkpoint if checkpoint in ("fp", "gguf") else VOCAB_LABELS[CHECKPOINTS[checkpoint][1]]
                )
                if checkpoint in CHECKPOINTS and CHECKPOINTS[checkpoint][2]:
                    vocab += f" + {DEFAULT_KEPT_ROWS} rows"
                rows.append({"model": model, "method": method, "vocab": vocab, "dtype": dtype, **result})
                print(json.dumps(rows[-1]), flush=True)
    record = {
        **result_header("vllm_speed"),
        "settings": {
            "new_tokens": NEW_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "prefill": [PREFILL_PROMPTS, PREFILL_TOKENS],
            "kept_fraction": KEPT_FRACTION,
            "kept_vocab_rows": DEFAULT_KEPT_ROWS,
            "repeats": REPEATS,
            "llama_shape": LLAMA_SHAPE,
        },
        "rows": rows,
        "skipped": skipped,
    }
    path = write_json(args.out / f"vllm_speed_{record['date'][:10]}.json", record)
    write_atomic(path.with_suffix(".md"), markdown_table(record))
    print(markdown_table(record))
    print(f"wrote {path} and its .md table")
    return 0


if __name__ == "__main__":
    from lape_awq.bench.commands import run_as_script

    run_as_script(__spec__.name)
