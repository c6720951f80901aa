"""The pipeline from a model directory to a checkpoint runs the method its spec and manifest name."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from conftest import build_tiny_model
from lape_awq.quant.awq.pipeline import Build, KeepSpec, quantize_checkpoint, quantize_checkpoints
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.checkpoint.layout import MANIFEST, WEIGHTS
from lape_awq.quant.checkpoint.writer import checkpoint_tensors
from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.neurons_file import NeuronsFile
from lape_awq.quant.model_loading import config_hash
from lape_awq.quant.vocab.quantizer import VocabSpec

CALIB = CalibrationSpec(("en", "ko"), 4, 64)
KO = [torch.tensor([1, 40, 127]), torch.tensor([7])]


def neurons_file(model_dir: Path, path: Path, ko: list[torch.Tensor] = KO) -> Path:
    """A neurons file for the model in `model_dir` whose Korean neurons are `ko`."""
    layers, neurons = len(ko), 128
    mask = torch.zeros(2, layers, neurons, dtype=torch.bool)
    for i, idx in enumerate(ko):
        mask[0, i, idx] = True
    entropy = torch.where(mask.any(0), 0.1, torch.inf).double()
    model_hash = config_hash(AutoConfig.from_pretrained(model_dir))
    nf = NeuronsFile(
        ["ko", "en"],
        torch.zeros(layers, neurons, 2, dtype=torch.int64),
        torch.tensor([100, 100]),
        entropy,
        mask,
        {"model": {"config_sha256": model_hash}},
    )
    nf.save(path)
    return path


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_kept_neurons_keep_the_spec_method(method: str, tokenizer, tmp_path: Path) -> None:
    """RTN + kept neurons is RTN (it once ran AWQ under an `rtn-opt` manifest): every tensor equals the
    in-memory quantizer's for the same spec, calibration and kept neurons."""
    model = build_tiny_model("llama", len(tokenizer))
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    keep = KeepSpec(neurons_file(model_dir, tmp_path / "n.safetensors"))
    spec = QuantSpec(method, group_size=32)

    manifest = quantize_checkpoint(model_dir, tmp_path / "ckpt", spec, CALIB, keep, progress=False)
    assert manifest["method"] == f"{method}-opt"
    assert manifest["quant_spec"]["method"] == method
    written = load_file(tmp_path / "ckpt" / WEIGHTS)

    expected_model = copy.deepcopy(model)
    quantized = quantize_model(expected_model, calibration_batch(tokenizer, CALIB), spec, KO, progress=False)
    expected = checkpoint_tensors(expected_model, quantized)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert (tmp_path / "ckpt" / MANIFEST).is_file()


@pytest.mark.parametrize(
    ("arch", "ko"),
    [("llama", KO), ("gemma3", [torch.tensor([], dtype=torch.int64), torch.tensor([3, 99])])],
)
def test_awq_and_awq_opt_built_together_equal_each_built_alone(
    arch: str, ko: list[torch.Tensor], tokenizer, tmp_path: Path
) -> None:
    """`quantize_checkpoints` (one model load, one calibration, shared vocabulary codes, the searches no
    kept neuron tells apart run once) writes, tensor for tensor, what two `quantize_checkpoint` calls
    write; the Gemma case has a layer with no kept neuron, whose MLP searches are shared too."""
    model = build_tiny_model(arch, len(tokenizer))
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    keep = KeepSpec(neurons_file(model_dir, tmp_path / "n.safetensors", ko))
    spec = QuantSpec("awq", group_size=32)
    plain_vocab, kept_vocab = VocabSpec(4, 32), VocabSpec(4, 32, ("ko",), 64)
    alone = tmp_path / "alone"
    quantize_checkpoint(model_dir, alone / "awq", spec, CALIB, None, False, vocab=plain_vocab)
    quantize_checkpoint(model_dir, alone / "awq-opt", spec, CALIB, keep, False, vocab=kept_vocab)
    together = tmp_path / "together"
    builds = [Build(together / "awq", None, plain_vocab), Build(together / "awq-opt", keep, kept_vocab)]
    manifests = quantize_checkpoints(model_dir, builds, spec, CALIB, progress=False)

    assert [m["method"] for m in manifests] == ["awq", "awq-opt"]
    assert manifests[1]["built_together_with"] == ["awq"]
    for name in ("awq", "awq-opt"):
        expected, written = load_file(alone / name / WEIGHTS), load_file(together / name / WEIGHTS)
        assert written.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(written[key], tensor), (name, key)
    # the builds differ where they should: the kept neurons and kept vocabulary rows
    awq, opt = load_file(together / "awq" / WEIGHTS), load_file(together / "awq-opt" / WEIGHTS)
    assert any(".sparse_" in key for key in opt) and not any(".sparse_" in key for key in awq)
    with pytest.raises(UserError, match="same directory"):
        quantize_checkpoints(model_dir, [builds[0], builds[0]], spec, CALIB, progress=False, overwrite=True)


def test_a_default_checkpoint_of_an_earlier_recipe_is_found_stale(tmp_path: Path) -> None:
    """`lape-awq serve` / `demo` reuse a default checkpoint only when its manifest records the current
    default recipe (and, for AWQ-opt, the current neurons file); one of an earlier recipe is rebuilt."""
    import json
    from dataclasses import asdict

    from lape_awq.quant.awq.default_checkpoints import stale_reason
    from lape_awq.quant.file_io import sha256_file
    from lape_awq.quant.vocab.quantizer import default_vocab

    neurons = tmp_path / "n.safetensors"
    neurons.write_bytes(b"neurons")
    recipe = {
        "method": "awq-opt",
        "quant_spec": QuantSpec("awq").record(),
        "vocab_spec": asdict(default_vocab(("ko",))),
    }
    manifest = {**json.loads(json.dumps(recipe)), "neurons_file": {"sha256": sha256_file(neurons)}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert stale_reason(tmp_path, recipe, neurons) is None
    older = {**manifest, "vocab_spec": {"bits": 16, "group_size": 128, "keep_langs": [], "max_rows": 0}}
    (tmp_path / MANIFEST).write_text(json.dumps(older))
    assert "its vocab_spec is" in stale_reason(tmp_path, recipe, neurons)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    neurons.write_bytes(b"other neurons")
    assert "other neurons" in stale_reason(tmp_path, recipe, neurons)
    (tmp_path / MANIFEST).unlink()
    assert "no readable" in stale_reason(tmp_path, recipe, neurons)
