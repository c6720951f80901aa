"""RTN / AWQ / AWQ-opt on tiny real-architecture models: folding is exact, AWQ beats RTN, kept neurons
are reproduced, and a checkpoint loads back to the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import ARCHITECTURES, build_tiny_model
from lape_awq.quant.awq_search import ScaleGroup, apply_scales
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.model_loading import decoder_layers
from lape_awq.quant.quantizer import QuantSpec, _mlp_norm, quantize_model
from lape_awq.quant.w4_modules import W4Linear, install_quantized

KEPT = [torch.tensor([0, 5, 127]), torch.tensor([31, 32, 64, 100])]  # first/last neuron, a group edge


def calib_and_eval(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    calib = calibration_batch(tokenizer, CalibrationSpec(("en", "ko"), 8, 64))
    held = calibration_batch(tokenizer, CalibrationSpec(("ja", "fr"), 4, 64, seed=7))
    return calib, held


def lively(model: nn.Module) -> nn.Module:
    """Random init is too tame for 4 bits to matter; give the weights outlier channels like real LMs."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in (*(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):  # fmt: skip
                lin.weight.mul_(1 + 4 * torch.rand(lin.weight.shape[1], generator=gen) ** 8)
    return model


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_scales_keeps_the_float_model_exact(arch: str, tokenizer) -> None:
    model = build_tiny_model(arch, len(tokenizer)).double()
    ids = calibration_batch(tokenizer, CalibrationSpec(("ko",), 2, 32))
    before = logits(model, ids)
    gen = torch.Generator().manual_seed(0)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        groups = [
            ScaleGroup("qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], [], None),
            ScaleGroup("gate_up", _mlp_norm(layer), [mlp.gate_proj, mlp.up_proj], [], None),
            ScaleGroup("down", mlp.up_proj, [mlp.down_proj], [], None),
        ]
        for g in groups:
            apply_scales(
                g, torch.rand(g.linears[0].in_features, generator=gen, dtype=torch.float64) * 3 + 0.1
            )
    # Gemma's RMSNorm computes in float32 even in a float64 model; a wrong fold is off by O(0.1).
    tolerance = 1e-6 if arch == "gemma3" else 1e-9
    assert torch.allclose(logits(model, ids), before, rtol=0, atol=tolerance)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_awq_error_is_below_rtn(arch: str, tokenizer) -> None:
    calib, held = calib_and_eval(tokenizer)
    base = lively(build_tiny_model(arch, len(tokenizer)))
    reference = logits(base, held)
    errors = {}
    for method in ("rtn", "awq"):
        model = copy.deepcopy(base)
        install_quantized(
            model, quantize_model(model, calib, QuantSpec(method, group_size=32), progress=False)
        )
        errors[method] = float((logits(model, held) - reference).pow(2).mean())
    assert 0 < errors["awq"] < 0.9 * errors["rtn"], errors


@pytest.mark.parametrize(("arch", "aware"), [("llama", True), ("gemma3", True), ("qwen2", False)])
def test_kept_neurons_are_reproduced(arch: str, aware: bool, tokenizer) -> None:
    calib, _ = calib_and_eval(tokenizer)
    model = lively(build_tiny_model(arch, len(tokenizer)))
    spec = QuantSpec("awq", group_size=32, search_aware=aware)
    quantized = quantize_model(model, calib, spec, kept=KEPT, progress=False)
    for i, layer in enumerate(decoder_layers(model)):
        keep = KEPT[i]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            q = quantized[f"model.layers.{i}.mlp.{proj}"]
            assert torch.equal(q.sparse_idx, keep)
            scaled = getattr(
                layer.mlp, proj
            ).weight.double()  # after scaling and clipping: what W4 approximates
            rows = "cols" if proj == "down_proj" else "rows"
            effective = W4Linear.from_quantized(q, rows).dense_weight(torch.float64).T  # [out, in]
            want = scaled[:, keep] if proj == "down_proj" else scaled[keep]
            got = effective[:, keep] if proj == "down_proj" else effective[keep]
            # exact up to the fp16 rounding of the residual: half an ulp, or 2^-25 below fp16 normals
            residual = (
                want - (got - (q.sparse.double().T if proj == "down_proj" else q.sparse.double()))
            ).abs()
            assert torch.all((got - want).abs() <= residual * 2**-11 + 2**-24), proj
            others = torch.ones(scaled.shape[0 if proj != "down_proj" else 1], dtype=torch.bool)
            others[keep] = False
            lost = (effective - scaled)[others] if proj != "down_proj" else (effective - scaled)[:, others]
            assert lost.abs().max() > 1e-4  # everything else really is quantized


def test_random_kept_neurons_change_only_their_rows(tokenizer) -> None:
    calib, _ = calib_and_eval(tokenizer)
    model = build_tiny_model("llama", len(tokenizer))
    plain = quantize_model(copy.deepcopy(model), calib, QuantSpec("rtn", group_size=32), progress=False)
    opt = quantize_model(
        copy.deepcopy(model), calib, QuantSpec("rtn", group_size=32), kept=KEPT, progress=False
    )
    name = "model.layers.1.mlp.gate_proj"
    assert torch.equal(plain[name].quant.codes, opt[name].quant.codes)  # rows: same groups, same codes
    assert plain[name].sparse is None and opt[name].sparse.shape == (4, 64)
