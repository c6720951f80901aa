"""Checkpoint: written atomically, loads back to the same logits, and every corruption is refused with
a message naming what is wrong."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import build_tiny_model
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.checkpoint.layout import MANIFEST, WEIGHTS, vocab_modules
from lape_awq.quant.checkpoint.reader import read_checkpoint
from lape_awq.quant.checkpoint.torch_reference import W4Linear, install_quantized, load_quantized_model
from lape_awq.quant.checkpoint.writer import write_checkpoint
from lape_awq.quant.errors import UserError
from lape_awq.quant.vocab.quantizer import VocabSpec, quantize_vocab, vocab_section

KEPT = [torch.tensor([3, 64, 127]), torch.tensor([0, 8])]
# Kept vocabulary rows: the first and last token and a Korean one ("금융").
KEPT_ROWS = torch.tensor([0, 200086, 262143])


def quantized_tiny(tokenizer, arch: str, kept: list[torch.Tensor] | None) -> tuple[nn.Module, dict]:
    model = build_tiny_model(arch, len(tokenizer))
    calib = calibration_batch(tokenizer, CalibrationSpec(("ko", "en"), 4, 64))
    return model, quantize_model(model, calib, QuantSpec("awq", group_size=32), kept=kept, progress=False)


def quantized_vocab(model: nn.Module, bits: int, kept_rows: torch.Tensor | None) -> dict:
    """The model's vocabulary matrices (embedding, and LM head when untied) at `bits`, group 32."""
    spec = VocabSpec(bits, 32, ("ko",), 0 if kept_rows is None else len(kept_rows))
    matrices = {
        m: quantize_vocab(model.get_submodule(m).weight, spec, kept_rows) for m in vocab_modules(model.config)
    }
    return {"vocab": matrices, "vocab_section": vocab_section(spec, kept_rows, "test")}


def write(
    out: Path,
    model: nn.Module,
    tokenizer,
    quantized: dict,
    kept: list[torch.Tensor] | None,
    overwrite: bool = False,
    vocab: dict | None = None,
) -> None:
    sparse = None
    if kept is not None:
        sparse = {
            "languages": ["ko"],
            "selection": "lape",
            "dtype": "float16",
            "projections": ["gate_proj", "up_proj", "down_proj"],
            "neurons_per_layer": [k.numel() for k in kept],
        }
    write_checkpoint(
        out, model, tokenizer, quantized, 32, sparse, {"method": "test"}, overwrite, **(vocab or {})
    )


@pytest.mark.parametrize(("arch", "opt"), [("llama", False), ("gemma3", True), ("qwen2", True)])
def test_save_load_gives_the_same_logits(arch: str, opt: bool, tokenizer, tmp_path: Path) -> None:
    kept = KEPT if opt else None
    model, quantized = quantized_tiny(tokenizer, arch, kept)
    write(tmp_path / "ckpt", model, tokenizer, quantized, kept)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == ("lape_awq" if opt else "awq")
    # Right after quantization, with the dense tensors rounded to fp16 as the checkpoint stores them.
    reference = copy.deepcopy(model)
    install_quantized(reference, quantized)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())
    loaded = load_quantized_model(tmp_path / "ckpt")
    assert sum(isinstance(m, W4Linear) for m in loaded.modules()) == 14
    ids = calibration_batch(tokenizer, CalibrationSpec(("ja",), 2, 48))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # no temp dir left


@pytest.mark.parametrize(
    ("arch", "tied", "bits"), [("gemma3", True, 4), ("llama", False, 8), ("qwen2", True, 4)]
)
def test_quantized_vocabulary_round_trips(
    arch: str, tied: bool, bits: int, tokenizer, tmp_path: Path
) -> None:
    model = build_tiny_model(arch, len(tokenizer), tie_word_embeddings=tied)
    quantized = quantize_model(model, None, QuantSpec("rtn", group_size=32), progress=False)
    vocab = quantized_vocab(model, bits, KEPT_ROWS)
    write(tmp_path / "ckpt", model, tokenizer, quantized, None, vocab=vocab)
    config, tensors = read_checkpoint(tmp_path / "ckpt")
    qc = config["quantization_config"]
    assert qc["quant_method"] == "lape_awq" and qc["vocab"]["bits"] == bits and qc["vocab"]["kept_rows"] == 3
    assert ("lm_head.qweight" in tensors) == (not tied) and "model.embed_tokens.weight" not in tensors
    # The reference: the quantized linears and, as the vocabulary, dequantized codes + kept residuals.
    reference = copy.deepcopy(model)
    install_quantized(reference, quantized)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())
        for module, q in vocab["vocab"].items():
            weight = q.quant.dequantize()
            weight[KEPT_ROWS] += q.sparse.float()
            reference.get_submodule(module).weight.copy_(weight)
            # Kept rows are the float model's own rows, up to the fp16 rounding of their residual.
            assert (weight[KEPT_ROWS] - model.get_submodule(module).weight[KEPT_ROWS]).abs().max() < 1e-3
    loaded = load_quantized_model(tmp_path / "ckpt")
    ids = calibration_batch(tokenizer, CalibrationSpec(("ko",), 2, 48))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.fixture(scope="module")
def good_checkpoint(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "ckpt"
    model, quantized = quantized_tiny(tokenizer, "llama", KEPT)
    write(out, model, tokenizer, quantized, KEPT)
    return out


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(path / WEIGHTS)
        edit(tensors)
        save_file(tensors, path / WEIGHTS)
        (path / MANIFEST).unlink()  # no stale hash: the tensor checks themselves must catch it

    return apply


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        edit(config)
        (path / "config.json").write_text(json.dumps(config))

    return apply


def _flip_a_byte(path: Path) -> None:
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-3] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))


MLP = "model.layers.0.mlp"
CORRUPTIONS = {
    "hash mismatch": (_flip_a_byte, "hash mismatch"),
    "missing tensor": (
        _edit_tensors(lambda t: t.pop(f"{MLP}.up_proj.scales")),
        f"missing tensor {MLP}.up_proj.scales",
    ),
    "wrong shape": (
        _edit_tensors(
            lambda t: t.update({f"{MLP}.gate_proj.qweight": t[f"{MLP}.gate_proj.qweight"][:, :-1].clone()})
        ),
        f"tensor {MLP}.gate_proj.qweight has shape",
    ),
    "wrong dtype": (
        _edit_tensors(lambda t: t.update({f"{MLP}.down_proj.scales": t[f"{MLP}.down_proj.scales"].float()})),
        f"tensor {MLP}.down_proj.scales has dtype",
    ),
    "nan": (
        _edit_tensors(lambda t: t[f"{MLP}.up_proj.sparse_rows"].view(-1).__setitem__(0, float("nan"))),
        f"tensor {MLP}.up_proj.sparse_rows holds NaN",
    ),
    "index out of range": (
        _edit_tensors(lambda t: t[f"{MLP}.down_proj.sparse_idx"].__setitem__(-1, 128)),
        f"tensor {MLP}.down_proj.sparse_idx: index out of range",
    ),
    "unsorted index": (
        _edit_tensors(
            lambda t: t.update({f"{MLP}.down_proj.sparse_idx": t[f"{MLP}.down_proj.sparse_idx"].flip(0)})
        ),
        f"tensor {MLP}.down_proj.sparse_idx: indices must be sorted and free of duplicates",
    ),
    "unexpected tensor": (
        _edit_tensors(lambda t: t.update({"extra.weight": torch.zeros(2)})),
        "unexpected tensor",
    ),
    "config disagrees with tensors": (
        _edit_config(lambda c: c["quantization_config"]["sparse"].update(neurons_per_layer=[3, 3])),
        "has shape",
    ),
    "bad bit width": (
        _edit_config(lambda c: c["quantization_config"].update(bits=8)),
        "unsupported quantization",
    ),
    "not quantized": (_edit_config(lambda c: c.pop("quantization_config")), "no awq / lape_awq"),
}


def assert_refused(checkpoint: Path, corruption: tuple[Callable[[Path], None], str], tmp_path: Path) -> None:
    """A copy of `checkpoint`, corrupted, is refused by the validator with the expected message."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    corrupt, message = corruption
    corrupt(bad)
    with pytest.raises(UserError) as info:
        read_checkpoint(bad)
    assert message in str(info.value)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoints_are_refused(case: str, good_checkpoint: Path, tmp_path: Path) -> None:
    assert_refused(good_checkpoint, CORRUPTIONS[case], tmp_path)


def test_good_checkpoint_validates(good_checkpoint: Path) -> None:
    config, tensors = read_checkpoint(good_checkpoint)
    assert config["quantization_config"]["sparse"]["neurons_per_layer"] == [3, 2]
    assert tensors[f"{MLP}.down_proj.sparse_idx"].tolist() == [3, 64, 127]


def test_existing_output_and_failed_write_leave_nothing(tokenizer, tmp_path: Path) -> None:
    model, quantized = quantized_tiny(tokenizer, "llama", None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        write(tmp_path / "taken", model, tokenizer, quantized, None)

    class BrokenTokenizer:
        def save_pretrained(self, _path: Path) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "ckpt", model, BrokenTokenizer(), quantized, None)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "taken", model, BrokenTokenizer(), quantized, None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert not list((tmp_path / "taken").iterdir())  # a failed overwrite keeps the old one as it was
    write(tmp_path / "taken", model, tokenizer, quantized, None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    read_checkpoint(tmp_path / "taken")


@pytest.fixture(scope="module")
def vocab_checkpoint(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untied Llama with a 4-bit vocabulary and kept rows: both vocabulary matrices stored."""
    out = tmp_path_factory.mktemp("vocab") / "ckpt"
    model = build_tiny_model("llama", len(tokenizer), tie_word_embeddings=False)
    quantized = quantize_model(model, None, QuantSpec("rtn", group_size=32), progress=False)
    write(out, model, tokenizer, quantized, None, vocab=quantized_vocab(model, 4, KEPT_ROWS))
    return out


EMB, HEAD = "model.embed_tokens", "lm_head"
VOCAB_CORRUPTIONS = {
    "vocab codes mis-shaped": (
        _edit_tensors(lambda t: t.update({f"{HEAD}.qweight": t[f"{HEAD}.qweight"][:-1].clone()})),
        f"tensor {HEAD}.qweight has shape",
    ),
    "vocab scales corrupt": (
        _edit_tensors(lambda t: t[f"{EMB}.scales"].view(-1).__setitem__(5, float("inf"))),
        f"tensor {EMB}.scales holds NaN or Inf",
    ),
    "vocab zero point out of range": (
        _edit_tensors(lambda t: t[f"{EMB}.qzeros"].view(-1).__setitem__(0, 16)),
        f"tensor {EMB}.qzeros holds zero points above 15",
    ),
    "vocab row index out of range": (
        _edit_tensors(lambda t: t[f"{HEAD}.sparse_idx"].__setitem__(-1, 262144)),
        f"tensor {HEAD}.sparse_idx: index out of range [0, 262144)",
    ),
    "vocab rows unsorted": (
        _edit_tensors(lambda t: t.update({f"{EMB}.sparse_idx": t[f"{EMB}.sparse_idx"].flip(0)})),
        f"tensor {EMB}.sparse_idx: indices must be sorted",
    ),
    "vocab head missing": (_edit_tensors(lambda t: t.pop(f"{HEAD}.scales")), f"missing tensor {HEAD}.scales"),
    "fp16 embedding left beside the codes": (
        _edit_tensors(lambda t: t.update({f"{EMB}.weight": torch.zeros(262144, 64).half()})),
        f"unexpected tensor {EMB}.weight",
    ),
    "vocab bit width": (
        _edit_config(lambda c: c["quantization_config"]["vocab"].update(bits=3)),
        "vocab.bits must be 4 or 8",
    ),
    "vocab group size": (
        _edit_config(lambda c: c["quantization_config"]["vocab"].update(group_size=48)),
        "vocab.group_size must be 32, 64 or 128",
    ),
    "vocab kept count not an integer": (
        _edit_config(lambda c: c["quantization_config"]["vocab"].update(kept_rows=True)),
        "vocab.kept_rows must be a non-negative integer",
    ),
    "vocab kept count disagrees": (
        _edit_config(lambda c: c["quantization_config"]["vocab"].update(kept_rows=2)),
        f"tensor {EMB}.sparse_idx has shape",
    ),
}


@pytest.mark.parametrize("case", sorted(VOCAB_CORRUPTIONS))
def test_corrupt_vocabularies_are_refused(case: str, vocab_checkpoint: Path, tmp_path: Path) -> None:
    assert_refused(vocab_checkpoint, VOCAB_CORRUPTIONS[case], tmp_path)
