"""vLLM engine speed and weight memory: FP vs our AWQ vs our AWQ-opt vs stock vLLM AWQ, in one run.

Two models: the embedded default (Gemma 3 270M, float32 as vLLM needs on CPU; stock AWQ cannot run it
there: it needs fp16/bf16, which Gemma 3 refuses / this CPU's bf16 path crashes) and a Llama-shaped model
with random weights, large enough that decode streams the weights (float16, vocabulary 32k). Speed does
not depend on how the 4-bit codes were chosen, so the checkpoints here are RTN-quantized (seconds instead of
minutes of AWQ search); AWQ-opt keeps 0.25% random neurons per MLP, about the default model's 0.21%.

    python -m lape_awq.bench.vllm_speed [--out bench/results]     (run it alone: it uses every core)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lape_awq.bench.run_info import git_commit, machine

NEW_TOKENS = 64
PROMPT_TOKENS = 32
PREFILL_PROMPTS, PREFILL_TOKENS = 8, 256
KEPT_FRACTION = 0.0025
LLAMA_SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def write_checkpoints(model: torch.nn.Module, tokenizer, root: Path, seed: int) -> dict[str, Path]:
    """FP (the float model itself), plain W4 and W4 + random kept neurons, all RTN g128."""
    from lape_awq.quant.checkpoint import write_checkpoint
    from lape_awq.quant.model_loading import decoder_mlps
    from lape_awq.quant.quantizer import QuantSpec, quantize_model

    gen = torch.Generator().manual_seed(seed)
    mlps = decoder_mlps(model)
    inter = mlps[0].down_proj.in_features
    k = max(1, round(KEPT_FRACTION * inter))
    kept = [torch.randperm(inter, generator=gen)[:k].sort().values for _ in mlps]
    paths = {"fp": root / "fp"}
    model.save_pretrained(paths["fp"])
    tokenizer.save_pretrained(paths["fp"])
    for name, keep in (("awq", None), ("awq-opt", kept)):
        quantized = quantize_model(model, None, QuantSpec("rtn"), kept=keep, progress=False)
        sparse = None
        if keep is not None:
            sparse = {"languages": [], "selection": "random", "dtype": "float16",
                      "projections": ["gate_proj", "up_proj", "down_proj"],
                      "neurons_per_layer": [len(x) for x in keep]}  # fmt: skip
        paths[name] = root / name
        write_checkpoint(paths[name], model, tokenizer, quantized, 128, sparse, {"method": f"bench-{name}"})
    return paths


def measure(model: Path, dtype: str, quantization: str | None, skip_tokenizer: bool) -> dict[str, float]:
    """Decode tokens/s at batch 1 and 16, prefill tokens/s, and the bytes of the loaded weights."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model), dtype=dtype, quantization=quantization, max_model_len=1024, enforce_eager=False,
        skip_tokenizer_init=skip_tokenizer, seed=0, enable_prefix_caching=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def prompts(count: int, length: int) -> list[TokensPrompt]:
        return [
            TokensPrompt(prompt_token_ids=torch.randint(10, 30000, (length,), generator=gen).tolist())
            for _ in range(count)
        ]

    def rate(batch: list[TokensPrompt], new_tokens: int, counted: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return counted / (time.perf_counter() - start)

    rate(prompts(2, PROMPT_TOKENS), 8, 1)  # warm-up (compilation, caches)
    result = {
        "decode_tok_s_b1": rate(prompts(1, PROMPT_TOKENS), NEW_TOKENS, NEW_TOKENS),
        "decode_tok_s_b16": rate(prompts(16, PROMPT_TOKENS), NEW_TOKENS, 16 * NEW_TOKENS),
        "prefill_tok_s": rate(prompts(PREFILL_PROMPTS, PREFILL_TOKENS), 1, PREFILL_PROMPTS * PREFILL_TOKENS),
        "weight_bytes": llm.apply_model(
            lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
        )[0],
    }
    llm = None  # drop the engine before the next one starts
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: apply_model, less noise
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lape_awq.quant.default_model import prepare_default_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="lape-awq-vllm-speed-") as tmp:
        default_dir = prepare_default_model()
        gemma = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(default_dir)  # the Llama runs without one (token ids only)
        gemma_paths = write_checkpoints(gemma, tokenizer, Path(tmp) / "gemma", 0)
        del gemma
        torch.manual_seed(0)
        llama = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_SHAPE), dtype=torch.float32)
        llama_paths = write_checkpoints(llama, tokenizer, Path(tmp) / "llama", 1)
        del llama
        plan = [
            ("gemma3-270m", "fp", gemma_paths["fp"], "float32", None, False),
            ("gemma3-270m", "our awq", gemma_paths["awq"], "float32", "lape_awq", False),
            ("gemma3-270m", "our awq-opt", gemma_paths["awq-opt"], "float32", None, False),
            ("llama-0.4b-random", "fp", llama_paths["fp"], "float16", None, True),
            ("llama-0.4b-random", "stock vllm awq", llama_paths["awq"], "float16", None, True),
            ("llama-0.4b-random", "our awq", llama_paths["awq"], "float16", "lape_awq", True),
            ("llama-0.4b-random", "our awq-opt", llama_paths["awq-opt"], "float16", None, True),
        ]
        for i, (model, method, path, dtype, quantization, skip_tok) in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {model} {method} ({dtype})", flush=True)
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "dtype": dtype,
                    **measure(path, dtype, quantization, skip_tok),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    record = {
        "benchmark": "vllm_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine(),
        "settings": {
            "new_tokens": NEW_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "prefill": [PREFILL_PROMPTS, PREFILL_TOKENS],
            "kept_fraction": KEPT_FRACTION,
            "llama_shape": LLAMA_SHAPE,
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"vllm_speed_{record['date'][:10]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
