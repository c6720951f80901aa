"""The rules that choose the kept neurons within a budget, the neuron sensitivity they rank by, and the
AWQ search options measured beside them (an identity point in the scale grid, unscaled groups)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_pipeline import neurons_file
from test_quantizer import calib_and_eval, lively
from torch import nn

from conftest import build_tiny_model
from lape_awq.quant.architectures import decoder_layers
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.awq.search import ScaleSearch, search_scales
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.checkpoint.layout import MANIFEST
from lape_awq.quant.cli.main import main
from lape_awq.quant.errors import UserError
from lape_awq.quant.lape.kept_neurons import language_neurons, select_neurons
from lape_awq.quant.lape.neurons_file import NeuronsFile
from lape_awq.quant.lape.sensitivity import neuron_sensitivity
from lape_awq.quant.w4_math import quantize_groups


@torch.no_grad()
def test_sensitivity_is_the_output_error_of_rounding_one_down_column(tokenizer) -> None:
    """A neuron's score is the mean squared change of its layer's MLP output, per token, when only its
    down_proj column is replaced by its 4-bit value: checked by running the perturbed MLP module on the
    captured MLP inputs (float64), for the top-scored and a few other neurons of each layer."""
    model = lively(build_tiny_model("gemma3", len(tokenizer))).double()
    batch = calibration_batch(tokenizer, CalibrationSpec(("ko",), 4, 64))
    scores = neuron_sensitivity(model.float(), batch, 32, chunk_size=2, progress=False)
    model.double()
    mlp_inputs: list[list[torch.Tensor]] = [[] for _ in decoder_layers(model)]
    handles = [
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: mlp_inputs[i].append(args[0]))
        for i, layer in enumerate(decoder_layers(model))
    ]
    model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    tokens = batch.numel()
    for i, layer in enumerate(decoder_layers(model)):
        down = layer.mlp.down_proj
        x = mlp_inputs[i][0]
        reference = layer.mlp(x)
        rounded = quantize_groups(down.weight.float(), 32).dequantize().double()
        for j in {int(scores[i].argmax()), 0, 31, 100}:
            original = down.weight[:, j].clone()
            down.weight[:, j] = rounded[:, j]
            moved = float((layer.mlp(x) - reference).pow(2).sum()) / tokens
            down.weight[:, j] = original
            assert abs(float(scores[i, j]) - moved) <= 1e-4 * moved + 1e-12, (
                i,
                j,
                float(scores[i, j]),
                moved,
            )
    assert float(scores.max()) > 10 * float(scores.median())  # it tells neurons apart


def synthetic_neurons(layers: int = 4, neurons: int = 16) -> NeuronsFile:
    """Korean neurons: 3 per layer at known places, with distinct entropies."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.zeros(2, layers, neurons, dtype=torch.bool)
    for i in range(layers):
        mask[0, i, torch.randperm(neurons, generator=gen)[:3]] = True
    entropy = torch.where(
        mask.any(0), torch.rand(layers, neurons, generator=gen, dtype=torch.float64), torch.inf
    )
    return NeuronsFile(
        ["ko", "en"], torch.zeros(layers, neurons, 2, dtype=torch.int64), torch.tensor([9, 9]), entropy, mask
    )


def as_set(kept: list[torch.Tensor]) -> set[tuple[int, int]]:
    return {(i, int(j)) for i, layer in enumerate(kept) for j in layer}


def test_the_neuron_rules_choose_within_the_budget() -> None:
    nf = synthetic_neurons()
    lape = as_set(language_neurons(nf, ["ko"]))
    assert len(lape) == 12
    assert as_set(select_neurons(nf, ["ko"])) == lape
    # lape-deep: the deeper half's LAPE neurons (the budget is larger than they are), then the lowest
    # entropy first when the budget is smaller.
    deep = as_set(select_neurons(nf, ["ko"], "lape-deep"))
    assert deep == {(i, j) for i, j in lape if i >= 2}
    two = as_set(select_neurons(nf, ["ko"], "lape-deep", max_neurons=2))
    assert two == set(sorted(deep, key=lambda n: float(nf.entropy[n]))[:2])

    sensitivity = torch.rand(4, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    by_sensitivity = sorted(lape, key=lambda n: -float(sensitivity[n]))
    chosen = as_set(select_neurons(nf, ["ko"], "lape-sensitive", 5, sensitivity))
    assert chosen == set(by_sensitivity[:5])
    # sensitive: any neuron, as many as LAPE finds unless told.
    anywhere = as_set(select_neurons(nf, ["ko"], "sensitive", None, sensitivity))
    everything = sorted(((i, j) for i in range(4) for j in range(16)), key=lambda n: -float(sensitivity[n]))
    assert anywhere == set(everything[:12]) and anywhere != lape
    with pytest.raises(ValueError, match="needs a"):
        select_neurons(nf, ["ko"], "sensitive")
    with pytest.raises(UserError, match="unknown neuron rule"):
        select_neurons(nf, ["ko"], "entropy")


def test_the_cli_keeps_the_sensitive_neurons(tiny_model_dir, tmp_path: Path, capsys) -> None:
    """`--neuron-rule sensitive --max-neurons 5` keeps 5 neurons, recorded in the manifest; the rule is
    refused without kept neurons."""
    model_dir = tiny_model_dir("llama")
    neurons = neurons_file(model_dir, tmp_path / "n.safetensors")
    out = tmp_path / "ckpt"
    common = ["--model", str(model_dir), "--calib-langs", "en,ko", "--calib-samples", "4"]
    common += ["--calib-seqlen", "64", "--group-size", "32", "--vocab-bits", "16", "--quiet"]
    code = main(
        [
            "quantize",
            *common,
            "--method",
            "gptq-opt",
            "--neurons",
            str(neurons),
            "--neuron-rule",
            "sensitive",
            "--max-neurons",
            "5",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["neurons_file"]["rule"] == "sensitive"
    config = json.loads((out / "config.json").read_text())
    assert sum(config["quantization_config"]["sparse"]["neurons_per_layer"]) == 5
    capsys.readouterr()
    assert (
        main(
            [
                "quantize",
                *common,
                "--method",
                "gptq",
                "--neuron-rule",
                "sensitive",
                "--out",
                str(tmp_path / "no"),
            ]
        )
        != 0
    )
    assert "--neuron-rule" in capsys.readouterr().err


@torch.no_grad()
def test_the_identity_point_wins_where_scaling_can_only_hurt() -> None:
    """Weights already on the 4-bit grid: no scaling quantizes them exactly, every grid point of AWQ's
    search moves them off it. With the identity point the search returns s = 1; without, something else
    at a higher loss."""
    gen = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 16, (32, 64), generator=gen)
    codes[:, ::32] = 0  # every group of 32 holds both ends of the grid: its scale and zero are exact
    codes[:, 1::32] = 15
    linear = nn.Linear(64, 32, bias=False)
    linear.weight.data = (codes.float() - 8) * 0.125
    x = torch.randn(2, 16, 64, generator=gen) * (1 + 5 * torch.rand(64, generator=gen))

    def search(identity: bool) -> torch.Tensor:
        group = ScaleSearch("t", nn.Linear(64, 64), [linear], [x], lambda _c, xs: linear(xs))
        return search_scales(group, 32, identity=identity)

    assert torch.equal(search(True), torch.ones(64))
    assert not torch.allclose(search(False), torch.ones(64), atol=1e-3)


@torch.no_grad()
def test_skipped_scaling_groups_leave_their_smooth_op_alone(tokenizer) -> None:
    """`skip_scaling=("qkv",)` on Gemma 3: the input norms keep their weights, the MLP's norm is still
    scaled; an unknown group is refused with the family's groups. The manifest form leaves the later
    options out at their defaults only."""
    calib, _ = calib_and_eval(tokenizer)
    base = lively(build_tiny_model("gemma3", len(tokenizer)))
    for skip, touched in (((), True), (("qkv",), False)):
        model = copy.deepcopy(base)
        quantize_model(model, calib, QuantSpec("awq", group_size=32, skip_scaling=skip), progress=False)
        for old, new in zip(decoder_layers(base), decoder_layers(model), strict=True):
            same = torch.equal(old.input_layernorm.weight, new.input_layernorm.weight)
            assert same != touched, skip
            assert not torch.equal(old.pre_feedforward_layernorm.weight, new.pre_feedforward_layernorm.weight)
    with pytest.raises(UserError, match=r"no scaling group qk .*qkv, vo, gate_up, down"):
        quantize_model(copy.deepcopy(base), calib, QuantSpec("awq", skip_scaling=("qk",)), progress=False)
    assert "scale_identity" not in QuantSpec().record() and "skip_scaling" not in QuantSpec().record()
    assert QuantSpec(skip_scaling=("qkv",), scale_identity=True).record()["skip_scaling"] == ("qkv",)
