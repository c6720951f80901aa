"""RTN / AWQ / AWQ-opt on tiny real-architecture models: AWQ beats RTN, kept neurons are reproduced
exactly, and only they change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import ARCHITECTURES, build_tiny_model
from lape_awq.quant.architectures import decoder_layers
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch
from lape_awq.quant.checkpoint.torch_reference import W4Linear, install_quantized
from lape_awq.quant.lape.kept_neurons import random_like

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
            for lin in (
                *(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
            ):
                lin.weight.mul_(1 + 4 * torch.rand(lin.weight.shape[1], generator=gen) ** 8)
    return model


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


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
    """RTN with random kept neurons against plain RTN: gate/up differ only in the kept rows, down only in
    the column groups that hold a kept column (those leave the group's range); the kept weights are the
    float ones, and every other weight of every linear is identical."""
    calib, _ = calib_and_eval(tokenizer)
    model = lively(build_tiny_model("llama", len(tokenizer)))
    kept = random_like(KEPT, 128, seed=3)
    assert [k.numel() for k in kept] == [k.numel() for k in KEPT]
    assert any(not torch.equal(a, b) for a, b in zip(kept, KEPT, strict=True))
    spec = QuantSpec("rtn", group_size=32)
    plain = quantize_model(copy.deepcopy(model), calib, spec, progress=False)
    opt = quantize_model(copy.deepcopy(model), calib, spec, kept=kept, progress=False)
    assert plain.keys() == opt.keys()
    for name, q in plain.items():
        i, proj = int(name.split(".")[2]), name.rpartition(".")[2]
        float_w = model.get_submodule(name).weight.double()
        before = W4Linear.from_quantized(q, None).dense_weight(torch.float64).T  # [out, in]
        dim = "cols" if proj == "down_proj" else "rows"
        after = W4Linear.from_quantized(opt[name], dim if opt[name].sparse is not None else None)
        after = after.dense_weight(torch.float64).T
        changed = before != after
        if not proj.endswith(("gate_proj", "up_proj", "down_proj")):
            assert opt[name].sparse is None and not changed.any(), name
            continue
        keep = kept[i]
        if dim == "rows":
            expected_rows = torch.zeros(changed.shape[0], dtype=torch.bool)
            expected_rows[keep] = True
            assert torch.equal(changed.any(dim=1), expected_rows), name
            exact = after[keep]
            want = float_w[keep]
        else:
            in_groups = torch.zeros(changed.shape[1], dtype=torch.bool)
            for g in (keep // 32).unique():
                in_groups[g * 32 : (g + 1) * 32] = True
            assert not changed[:, ~in_groups].any(), name
            assert changed[:, keep].any(dim=0).all(), name
            exact, want = after[:, keep], float_w[:, keep]
        assert torch.allclose(exact, want, rtol=2**-10, atol=2**-20), name  # fp16 residuals
