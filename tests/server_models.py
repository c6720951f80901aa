"""Checkpoints the server tests serve: tiny Gemma 3 AWQ / AWQ-opt, and float "scripted" models.

A scripted model answers every chat prompt with a fixed token sequence, by construction: attention and
MLP outputs are zero, so the logits depend on the current token only, and the unembedding maps each
token of the script to the next one. The byte-cycle model spells "한국어한국어…" as UTF-8 byte tokens
(<0xED> <0x95> <0x9C> …), so every Hangul syllable is split across three tokens: the hardest case for
streaming detokenization. The verdict judge answers "[[A]]": a real model behind a real server for the
pairwise judge.
"""

from __future__ import annotations

from pathlib import Path

import torch
from test_checkpoint import write
from test_vllm_method import KEPT, boost_residuals
from transformers import AutoModelForCausalLM

from conftest import VLLM_ATTENTION, build_tiny_model
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch

CYCLE_TEXT = "한국어"
NEWLINE = "\n"  # the last token of a Gemma-turn chat prompt ("<start_of_turn>model\n")


def byte_tokens(tokenizer, text: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in text.encode()]


def write_quantized_pair(root: Path, tokenizer) -> dict[str, Path]:
    """`awq` and `awq-opt` checkpoints of one tiny Gemma 3 (the opt one with large residuals, so the two
    give clearly different logprobs)."""
    model = build_tiny_model("gemma3", len(tokenizer), **VLLM_ATTENTION)
    with torch.no_grad():  # sharper next-token distributions than a fresh init's near-uniform ones
        model.get_input_embeddings().weight.mul_(8)
    calib = calibration_batch(tokenizer, CalibrationSpec(("ko", "en"), 4, 64))
    paths = {}
    for name, kept in (("awq", None), ("awq-opt", KEPT)):
        quantized = quantize_model(model, calib, QuantSpec("awq", group_size=32), kept=kept, progress=False)
        paths[name] = root / f"tiny-gemma3-{name}"
        write(paths[name], model, tokenizer, quantized, kept)
        if kept:
            boost_residuals(paths[name], seed=1)
    return paths


def write_scripted_model(path: Path, tokenizer, script: list[int], then: int | None = None) -> Path:
    """A float tiny Gemma 3 whose greedy continuation of a prompt ending in a newline (every chat prompt)
    is `script`, followed by `then` (default: the script again, forever). Script tokens must be distinct."""
    if len(set(script)) != len(script):
        raise ValueError("a scripted model needs distinct tokens: the next token depends on the current one")
    # A context long enough for a judge's prompt plus its 2048-token reply budget.
    model = build_tiny_model(
        "gemma3", len(tokenizer), tie_word_embeddings=False, max_position_embeddings=8192, **VLLM_ATTENTION
    )
    sources = [tokenizer.convert_tokens_to_ids(NEWLINE), *script]
    targets = [*script, script[0] if then is None else then]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        head = model.lm_head.weight
        head.mul_(0.01)
        for target in set(targets):
            froms = [s for s, t in zip(sources, targets, strict=True) if t == target]
            head[target] = 50 * torch.stack([embed[s] / embed[s].norm() for s in froms]).sum(0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_scripted_quantized_pair(root: Path, tokenizer, text: str) -> dict[str, Path]:
    """`awq` and `awq-opt` (RTN W4 g32) checkpoints of a scripted model answering `text` (distinct tokens)
    over and over. The script survives quantization: it lives in the embeddings and the unembedding, which
    stay in float, while the attention and MLP outputs stay zero."""
    scripted = write_scripted_model(
        root / "scripted-fp", tokenizer, tokenizer(text, add_special_tokens=False).input_ids
    )
    model = AutoModelForCausalLM.from_pretrained(scripted, dtype=torch.float32)
    paths = {}
    for name, kept in (("awq", None), ("awq-opt", KEPT)):
        quantized = quantize_model(model, None, QuantSpec("rtn", group_size=32), kept=kept, progress=False)
        paths[name] = root / f"scripted-{name}"
        write(paths[name], model, tokenizer, quantized, kept)
    return paths


def write_byte_cycle_model(path: Path, tokenizer) -> Path:
    """Answers CYCLE_TEXT over and over, one UTF-8 byte per token."""
    return write_scripted_model(path, tokenizer, byte_tokens(tokenizer, CYCLE_TEXT))


def write_verdict_judge(path: Path, tokenizer, verdict: str = "[[A]]") -> Path:
    """A "judge" that answers every prompt with `verdict`, then <eos>."""
    script = tokenizer(verdict, add_special_tokens=False).input_ids
    return write_scripted_model(path, tokenizer, script, then=tokenizer.eos_token_id)
