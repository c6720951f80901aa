"""The vLLM method `lape_awq` in the real vLLM CPU engine, against the transformers torch reference.

Engines run in subprocesses (tests/vllm_runner.py) that never import lape_awq, so every engine test also
checks that vLLM finds the method through the plugin entry point. Tiny random Llama / Qwen2 / Gemma 3
with vLLM-compatible head size; their kept neurons get large random FP16 residuals so that a lost,
misplaced or mis-sharded sparse term moves the logprobs far beyond the tolerance. Gemma 3 and Qwen2 (tied)
and an untied Llama also carry a quantized vocabulary whose kept rows (the prompts' tokens among them) get
the same treatment. AWQ makes most checkpoints; a GPTQ and an AWQ + GPTQ one check that those methods' codes
and kept columns run unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checkpoint import CORRUPTIONS, VOCAB_CORRUPTIONS, quantized_vocab, write

from conftest import ARCHITECTURES, VLLM_ATTENTION, build_tiny_model
from lape_awq.kernels.awq_packing import pack_int4
from lape_awq.kernels.vocab_codes import dense_vocab
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.checkpoint.layout import MANIFEST, WEIGHTS
from lape_awq.quant.checkpoint.torch_reference import W4Linear, load_quantized_model
from lape_awq.quant.file_io import sha256_file

RUNNER = Path(__file__).with_name("vllm_runner.py")
KEPT = [torch.tensor([3, 64, 127]), torch.tensor([0, 50])]
# The CPU path and the reference both compute in fp32 (up to the order of sums). Logprobs of these tiny
# models are O(10), so this is a relative error of ~1e-3; fp16 models get 10x (their activations are fp16).
LOGPROB_TOLERANCE = 1e-2
PROMPT_TEXTS = ("한국어로 답해 주세요. 서울의 날씨는", "The capital of France is")


def run_engines(
    jobs: list[dict], multiprocess: bool = False, env: dict[str, str] | None = None
) -> list[dict]:
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    if not multiprocess:  # engine core and worker in the runner's own process: half the start-up time
        environment["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    done = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps({"jobs": jobs})],
        capture_output=True,
        text=True,
        timeout=900,
        env=environment,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("VLLM_RUNNER_RESULT ")]
    assert lines, f"runner failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("VLLM_RUNNER_RESULT "))


def boost_residuals(path: Path, seed: int) -> None:
    """Replace the stored sparse residuals by large random ones (and re-hash): still a valid checkpoint."""
    tensors = load_file(path / WEIGHTS)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.endswith((".sparse_rows", ".sparse_cols")):
            tensors[name] = (torch.randn(t.shape, generator=gen) * 0.1).half()
    save_file(tensors, path / WEIGHTS)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = sha256_file(path / WEIGHTS)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text).input_ids for text in PROMPT_TEXTS]


# Checkpoint -> (architecture, kept neurons, vocabulary bits or None for FP16, tied vocabulary, method).
CHECKPOINTS = {
    "llama-opt": ("llama", KEPT, None, True, "awq"),
    "llama-awq": ("llama", None, None, True, "awq"),
    "qwen2-opt": ("qwen2", KEPT, 8, True, "awq"),
    "gemma3-opt": ("gemma3", KEPT, 4, True, "awq"),
    "llama-untied-v4": ("llama", None, 4, False, "awq"),
    # GPTQ's codes are in the same format; the kept down columns hold compensated values, not the dense.
    "qwen2-gptq-opt": ("qwen2", KEPT, None, True, "gptq"),
    "gemma3-awq-gptq-opt": ("gemma3", KEPT, None, True, "awq-gptq"),
}
VOCAB_ROWS = ("model.embed_tokens.sparse_rows", "lm_head.sparse_rows")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer, prompts) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-ckpts")
    calib = calibration_batch(tokenizer, CalibrationSpec(("ko", "en"), 4, 64))
    # Kept vocabulary rows: the prompts' tokens (their embeddings reach every later position), the first and
    # the last token.
    kept_rows = torch.tensor(sorted({0, len(tokenizer) - 1, *(t for p in prompts for t in p)}))
    made = {}
    for name, (arch, kept, bits, tied, method) in CHECKPOINTS.items():
        model = build_tiny_model(arch, len(tokenizer), **VLLM_ATTENTION, tie_word_embeddings=tied)
        with torch.no_grad():  # sharper next-token distributions than a fresh init's near-uniform ones
            model.get_input_embeddings().weight.mul_(8)
        vocab = None if bits is None else quantized_vocab(model, bits, kept_rows)
        quantized = quantize_model(model, calib, QuantSpec(method, group_size=32), kept=kept, progress=False)
        write(root / name, model, tokenizer, quantized, kept, vocab=vocab)
        if kept or vocab:
            boost_residuals(root / name, seed=len(made))
        made[name] = root / name
    return made


def without_kept_vocabulary_rows(path: Path, out: Path) -> Path:
    """A copy of the checkpoint whose kept vocabulary rows have zero residuals (and a fresh hash)."""
    shutil.copytree(path, out)
    tensors = load_file(out / WEIGHTS)
    for name in VOCAB_ROWS:
        if name in tensors:
            tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, out / WEIGHTS)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = sha256_file(out / WEIGHTS)
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def reference(path: Path, prompts: list[list[int]], max_tokens: int, drop_sparse: bool = False) -> list[dict]:
    """Greedy tokens and logprobs from transformers running the checkpoint through W4Linear (fp32)."""
    model = load_quantized_model(path, torch.float32)
    if drop_sparse:
        for m in model.modules():
            if isinstance(m, W4Linear) and m.sparse is not None:
                m.sparse.zero_()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            generated = model.generate(x, max_new_tokens=max_tokens, do_sample=False)
            full = generated[0]
            logprobs = model(generated).logits[0].log_softmax(-1)
            steps = [logprobs[i - 1, full[i]].item() for i in range(1, len(full))]
            prompt_steps = [None, *steps[: len(ids) - 1]]
            out.append(
                {
                    "tokens": full[len(ids) :].tolist(),
                    "prompt_logprobs": prompt_steps,
                    "logprobs": steps[len(ids) - 1 :],
                }
            )
    return out


def max_logprob_gap(a: dict, b: dict) -> float:
    pairs = list(
        zip(a["prompt_logprobs"][1:] + a["logprobs"], b["prompt_logprobs"][1:] + b["logprobs"], strict=True)
    )
    return max(abs(x - y) for x, y in pairs)


@pytest.mark.parametrize("kind", ["rows", "cols", None])
def test_cpu_linear_matches_the_torch_reference(kind: str | None) -> None:
    """The CPU path of a W4 linear (AutoAWQ tensors converted to a code matrix, the kept neurons as its kept
    rows or as the columns' term) against the torch reference's effective weight in float64."""
    from lape_awq.kernels.cpu_codes import CodeMatrix
    from lape_awq.vllm_method.cpu_codes_ops import code_linear

    gen = torch.Generator().manual_seed(1)
    k_in, n_out, g = 128, 64, 32
    ref = W4Linear(k_in, n_out, g, bias=False, num_sparse=3 if kind else 0, sparse_kind=kind)
    ref.qweight.copy_(pack_int4(torch.randint(0, 16, (k_in, n_out), generator=gen)))
    ref.qzeros.copy_(pack_int4(torch.randint(0, 16, (k_in // g, n_out), generator=gen)))
    ref.scales.copy_((torch.rand(k_in // g, n_out, generator=gen) / 50).half())
    idx, values = torch.tensor([0, 17, 63]), torch.randn(3, k_in if kind == "rows" else n_out, generator=gen)
    if kind:
        ref.sparse_idx.copy_(idx)
        ref.sparse.copy_(values.half())
    rows = (idx, ref.sparse) if kind == "rows" else (None, None)
    matrix = CodeMatrix.from_awq(ref.qweight, ref.qzeros, ref.scales, *rows)
    cols = (
        (idx, ref.sparse.float()) if kind == "cols" else (torch.empty(0, dtype=torch.long), torch.empty(0, 0))
    )
    x = torch.randn(5, k_in, generator=gen)
    for m in (1, 5):  # one token (codes streamed) and, tiled past 16 rows, the GEMM path
        xs = x[:m] if m == 1 else x.repeat(4, 1)
        got = code_linear(xs, matrix, *cols)
        want = xs.double() @ ref.dense_weight(torch.float64)
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(matrix.kept()[0], idx if kind == "rows" else torch.empty(0, dtype=torch.long))


@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_vocabulary_forms_match_float64(bits: int) -> None:
    """The CUDA path's math (the Triton W4 kernel in its interpreter for 4 bits, a dequantized fp16 weight
    for 8) on CPU tensors: logits against float64, looked-up rows exact."""
    from lape_awq.kernels.vocab_codes import pack_codes
    from lape_awq.vllm_method.vocab_method import CudaVocab

    gen = torch.Generator().manual_seed(bits)
    rows, hidden, g = 96, 64, 32
    qweight = pack_codes(torch.randint(0, 2**bits, (rows, hidden), generator=gen), bits)
    qzeros = torch.randint(0, 2**bits, (rows, hidden // g), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(rows, hidden // g, generator=gen) / 20).half()
    idx, kept = torch.tensor([0, 40, 95]), torch.randn(3, hidden, generator=gen).half()
    vocab = CudaVocab.build(qweight, qzeros, scales, bits, g, idx, kept)
    dense = dense_vocab(qweight, qzeros, scales.double(), bits, idx, kept)
    x = torch.randn(5, hidden, generator=gen)
    ref = x.double() @ dense.T
    tolerance = 1e-4 if bits == 4 else 2e-3  # fp32 activations in the W4 kernel; fp16 for the 8-bit weight
    assert (vocab.logits(x).double() - ref).abs().max() <= tolerance * ref.abs().max()
    ids = torch.tensor([[0, 1, 40], [95, 7, 40]])
    exact = dense_vocab(qweight, qzeros, scales.float(), bits, idx, kept)
    assert torch.equal(vocab.embedding(ids), exact[ids])


def test_tensor_parallel_ownership_reassembles_the_full_term() -> None:
    from lape_awq.vllm_method.sparse_shards import local_gate_up_rows, owned

    gen = torch.Generator().manual_seed(1)
    inter, hidden, tp = 128, 16, 2
    idx = torch.tensor([0, 5, 63, 64, 100, 127])
    rows = torch.randn(6, hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(3, hidden, generator=gen, dtype=torch.float64)
    full = torch.zeros(3, 2 * inter, dtype=torch.float64)
    full[:, idx] += x @ rows.T
    full[:, inter + idx] += x @ rows.T
    shard = inter // tp
    for rank in range(tp):
        local, local_rows = local_gate_up_rows([idx, idx], [rows, rows], shard, rank)
        mine = torch.zeros(3, 2 * shard, dtype=torch.float64).index_add(-1, local, x @ local_rows.T)
        lo = rank * shard
        assert torch.allclose(
            mine, torch.cat([full[:, lo : lo + shard], full[:, inter + lo : inter + lo + shard]], 1)
        )
    h = torch.randn(3, inter, generator=gen, dtype=torch.float64)
    partials = []
    for rank in range(tp):
        local, cols = owned(idx, rows, shard, rank)
        partials.append(h[:, rank * shard : (rank + 1) * shard][:, local] @ cols)
    assert torch.allclose(sum(partials), h[:, idx] @ rows)


@pytest.fixture(scope="module")
def engine_results(checkpoints: dict[str, Path], prompts: list[list[int]]) -> dict[str, dict]:
    jobs = {
        **{f"{arch}-opt": {"model": str(checkpoints[f"{arch}-opt"])} for arch in ARCHITECTURES},
        # Gemma 3 in vLLM's compiled graph, as served (in place of its eager job, which the other families'
        # eager jobs cover): the quantized embedding's and linears' ops traced by torch.compile.
        "gemma3-opt": {"model": str(checkpoints["gemma3-opt"]), "enforce_eager": False},
        "llama-awq-as-lape": {"model": str(checkpoints["llama-awq"]), "quantization": "lape_awq"},
        "llama-opt-fp16": {"model": str(checkpoints["llama-opt"]), "dtype": "float16"},
        "llama-untied-v4": {"model": str(checkpoints["llama-untied-v4"])},
        "qwen2-opt-fp16": {"model": str(checkpoints["qwen2-opt"]), "dtype": "float16"},
        "qwen2-gptq-opt": {"model": str(checkpoints["qwen2-gptq-opt"])},
        "gemma3-awq-gptq-opt": {"model": str(checkpoints["gemma3-awq-gptq-opt"])},
    }
    results = run_engines([{**job, "prompts": prompts, "max_tokens": 6} for job in jobs.values()])
    return dict(zip(jobs, results, strict=True))


ENGINE_JOBS = [f"{arch}-opt" for arch in ARCHITECTURES] + [
    "llama-awq-as-lape",
    "llama-opt-fp16",
    "llama-untied-v4",
    "qwen2-opt-fp16",
    "qwen2-gptq-opt",
    "gemma3-awq-gptq-opt",
]


@pytest.mark.parametrize("name", ENGINE_JOBS)
def test_engine_matches_the_torch_reference(name: str, engine_results, checkpoints, prompts) -> None:
    result = engine_results[name]
    assert "error" not in result, result.get("error")
    assert result["quantization"] == "lape_awq"  # found through the entry point; the runner never imports us
    ckpt = checkpoints[name.removesuffix("-as-lape").removesuffix("-fp16")]
    expected = reference(ckpt, prompts, 6)
    tolerance = LOGPROB_TOLERANCE * (10 if name.endswith("fp16") else 1)  # fp16 end to end, not only the GEMM
    for got, want in zip(result["outputs"], expected, strict=True):
        assert got["tokens"] == want["tokens"]
        assert max_logprob_gap(got, want) <= tolerance
    if name.endswith("-opt"):  # the sparse term is visible at this tolerance: dropping it would fail
        without = reference(ckpt, prompts, 6, drop_sparse=True)
        assert (
            max(max_logprob_gap(w, wo) for w, wo in zip(expected, without, strict=True))
            > 5 * LOGPROB_TOLERANCE
        )


@pytest.mark.parametrize("name", ["gemma3-opt", "qwen2-opt", "llama-untied-v4"])
def test_engine_applies_the_kept_vocabulary_rows(
    name: str, engine_results, checkpoints, prompts, tmp_path
) -> None:
    """The engine matches the reference with the kept rows (above); without them the reference moves far
    beyond the tolerance, so a lost, misplaced or mis-sharded kept row would have failed that test."""
    bare = reference(without_kept_vocabulary_rows(checkpoints[name], tmp_path / "bare"), prompts, 6)
    gaps = [
        max_logprob_gap(got, want) for got, want in zip(engine_results[name]["outputs"], bare, strict=True)
    ]
    assert max(gaps) > 5 * LOGPROB_TOLERANCE


def test_gemma2_through_our_class(tokenizer, prompts, tmp_path: Path) -> None:
    """vLLM's Gemma 2 builds its embedding without the quantization config; the plugin registers our class
    for it. With a quantized vocabulary it loads and matches the reference; without one (a float model) it
    is vLLM's own, token for token and logprob for logprob (against vLLM with no plugin loaded)."""
    model = build_tiny_model("gemma2", len(tokenizer), **VLLM_ATTENTION)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    model.save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    quantized = quantize_model(model, None, QuantSpec("rtn", group_size=32), progress=False)
    kept_rows = torch.tensor(sorted({0, *prompts[0]}))
    write(tmp_path / "v4", model, tokenizer, quantized, None, vocab=quantized_vocab(model, 4, kept_rows))
    boost_residuals(tmp_path / "v4", seed=9)
    jobs = [{"model": str(tmp_path / name), "prompts": prompts, "max_tokens": 6} for name in ("v4", "float")]
    quantized_run, ours = run_engines(jobs)
    (stock,) = run_engines(jobs[1:], env={"VLLM_PLUGINS": ""})
    assert "error" not in quantized_run, quantized_run.get("error")
    for got, want in zip(quantized_run["outputs"], reference(tmp_path / "v4", prompts, 6), strict=True):
        assert got["tokens"] == want["tokens"] and max_logprob_gap(got, want) <= LOGPROB_TOLERANCE
    assert ours["outputs"] == stock["outputs"]


def test_plain_awq_without_the_flag_stays_with_stock_vllm(checkpoints, prompts) -> None:
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        pytest.skip("stock vLLM AWQ on CPU needs cpu_gemm_wna16, which this vLLM library lacks (no AVX-512)")
    (result,) = run_engines(
        [
            {
                "model": str(checkpoints["llama-awq"]),
                "prompts": prompts[:1],
                "max_tokens": 2,
                "dtype": "float16",
            }
        ]
    )
    assert result.get("quantization") == "awq", result


def test_tensor_parallel_2_equals_tp_1(checkpoints, prompts, engine_results) -> None:
    job = {"model": str(checkpoints["gemma3-opt"]), "prompts": prompts, "max_tokens": 6, "tp": 2}
    (result,) = run_engines([job], multiprocess=True, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert "error" not in result, result.get("error")
    for tp2, tp1 in zip(result["outputs"], engine_results["gemma3-opt"]["outputs"], strict=True):
        assert tp2["tokens"] == tp1["tokens"]
        assert max_logprob_gap(tp2, tp1) <= LOGPROB_TOLERANCE


def test_bad_checkpoints_are_refused_with_the_validators_message(checkpoints, tmp_path: Path) -> None:
    jobs, messages = [], []
    # Without quantization_config vLLM sees a plain model, not ours: that one is the validator's alone.
    for case, (corrupt, message) in CORRUPTIONS.items():
        if case == "not quantized":
            continue
        bad = tmp_path / case.replace(" ", "-")
        shutil.copytree(checkpoints["llama-opt"], bad)
        corrupt(bad)
        jobs.append({"model": str(bad), "prompts": [[2, 651]], "max_tokens": 1})
        messages.append(message)
    for case, (corrupt, message) in VOCAB_CORRUPTIONS.items():
        bad = tmp_path / case.replace(" ", "-")
        shutil.copytree(checkpoints["llama-untied-v4"], bad)
        corrupt(bad)
        jobs.append({"model": str(bad), "prompts": [[2, 651]], "max_tokens": 1})
        messages.append(message)
    for result, message in zip(run_engines(jobs), messages, strict=True):
        assert "error" in result, f"served a corrupt checkpoint ({message})"
        assert "lape_awq refuses checkpoint" in result["error"] and message in result["error"], result[
            "error"
        ]
