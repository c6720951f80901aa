"""GPTQ in the W4 format: the rounding against a slow reference, RTN on an identity Hessian, below RTN /
AWQ on tiny real-architecture models, kept neurons exact, language-weighted calibration (weight 0 is
leaving the language out), and a gptq-opt checkpoint that loads back to the same logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from test_pipeline import KO, neurons_file
from test_quantizer import KEPT, calib_and_eval, lively
from torch import nn

from conftest import ARCHITECTURES, build_tiny_model
from lape_awq.quant.architectures import decoder_layers
from lape_awq.quant.awq.gptq import DAMP, gptq_quantize, input_hessian
from lape_awq.quant.awq.quantizer import QuantSpec, quantize_model, quantize_models
from lape_awq.quant.awq.search import ScaleSearch, search_clip, search_scales
from lape_awq.quant.calibration import CalibrationSpec, calibration_batch, weighted_calibration_batch
from lape_awq.quant.checkpoint.layout import MANIFEST
from lape_awq.quant.checkpoint.torch_reference import W4Linear, install_quantized, load_quantized_model
from lape_awq.quant.cli.main import main
from lape_awq.quant.errors import UserError
from lape_awq.quant.w4_math import group_params, quantize_groups, round_to_codes, search_group_params


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels of unequal size, as a linear's inputs are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(features) + 0.3 * torch.randn(features, features, generator=gen)
    scale = 1 + 3 * torch.rand(features, generator=gen)
    return (torch.randn(tokens, features, generator=gen) @ mix) * scale


def damped(h: torch.Tensor) -> torch.Tensor:
    """H as GPTQ inverts it: dead channels' diagonal 1, then the dampening on the diagonal."""
    h = h.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    return h


def reference_gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    g: int,
    keep: tuple[int, ...] = (),
    act_order: bool = False,
    grid_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ the slow way, in float64: columns in order (act-order: by decreasing H[i, i]; kept ones last,
    never rounded); a group's grid from its rounded columns' current weights when the first of them comes
    (act-order: from the given weights, all up front); after rounding column i, every column j not yet
    rounded moves by -err * Hinv[i, j] / Hinv[i, i] on the full inverse Hessian of the columns left, from
    which i is then eliminated. `grid_search`: each grid searched with column i's output error per unit
    of rounding squared, 1 / Hinv[i, i] when i is eliminated, as its weight. Returns codes, scales, zeros,
    final weights."""
    w = w.double().clone()
    n = w.shape[1]
    order = [j for j in range(n) if j not in keep]
    if act_order:
        order.sort(key=lambda j: -float(damped(h)[j, j]))
    cost = torch.zeros(n, dtype=torch.float64)
    hinv = torch.linalg.inv(damped(h))
    for i in order:  # the elimination alone, for the costs the grids need before the rounding starts
        cost[i] = 1 / hinv[i, i]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]

    def grid(
        grouped: torch.Tensor, skip: torch.Tensor | None, columns: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not grid_search:
            return group_params(grouped, skip)
        return search_group_params(grouped, cost[columns].reshape(1, *grouped.shape[1:]), skip)

    hinv = torch.linalg.inv(damped(h))
    left = list(range(n))
    codes = torch.zeros(w.shape, dtype=torch.int32)
    skip = torch.zeros(1, n // g, g, dtype=torch.bool)
    skip.view(-1)[list(keep)] = True
    scales, zeros = grid(w.float().reshape(w.shape[0], -1, g), skip, list(range(n)))  # static grids
    seen = set()
    for i in order:
        group = i // g
        if group not in seen and not act_order:
            seen.add(group)
            members = [j for j in range(group * g, (group + 1) * g) if j not in keep]
            s, z = grid(w[:, members].unsqueeze(1), None, members)
            scales[:, group], zeros[:, group] = s[:, 0], z[:, 0]
        s, z = scales[:, group].double(), zeros[:, group].double()
        code = round_to_codes(w[:, i], s, z)
        codes[:, i] = code.int()
        rounded = (code - z) * s
        err = w[:, i] - rounded
        left.remove(i)
        for j in left:
            w[:, j] -= err * hinv[i, j] / hinv[i, i]
        w[:, i] = rounded
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes, scales, zeros, w


def output_error(w: torch.Tensor, final: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the calibration output error GPTQ minimises (up to 2/n)."""
    d = (w - final).double()
    return float((d @ h.double() * d).sum())


@pytest.mark.parametrize("keep", [None, torch.tensor([0, 17, 31])])
def test_an_identity_hessian_is_round_to_nearest(keep: torch.Tensor | None) -> None:
    """With H = I no error moves: GPTQ's codes, scales and zeros are `quantize_groups`' (kept columns out
    of the range) and, kept columns aside, its weights are the dequantized codes."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 96, generator=gen) * (1 + 4 * torch.rand(96, generator=gen) ** 8)
    quant, final = gptq_quantize(w, torch.eye(96), 32, keep)
    skip = None
    if keep is not None:
        skip = torch.zeros(96, dtype=torch.bool)
        skip[keep] = True
    rtn = quantize_groups(w, 32, skip)
    assert torch.equal(quant.codes, rtn.codes)
    assert torch.equal(quant.scales, rtn.scales) and torch.equal(quant.zeros, rtn.zeros)
    expected = rtn.dequantize()
    if keep is not None:
        expected[:, keep] = w[:, keep]
    assert torch.equal(final, expected)


@pytest.mark.parametrize(("keep", "block"), [((), 128), ((), 32), ((3, 40, 41, 63), 32)])
def test_the_rounding_matches_the_column_by_column_reference(keep: tuple[int, ...], block: int) -> None:
    """16 x 64, groups of 32, correlated inputs with a dead channel: in float64, GPTQ (Cholesky of the
    inverse, lazy block updates, kept columns moved last) gives the reference's codes and grids exactly and
    its weights to 1e-9; in float32 (the default) its codes and output error are the reference's too."""
    x = correlated_inputs(512, 64)
    x[:, 9] = 0.0  # a channel the calibration never drives
    h = input_hessian([x.reshape(8, 64, 64)])
    assert torch.allclose(h, 2 * x.double().T @ x.double() / 512, rtol=1e-5, atol=1e-5)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    codes, scales, zeros, ref = reference_gptq(w, h, 32, keep)
    kept = torch.tensor(keep, dtype=torch.int64) if keep else None
    rounded = torch.ones(64, dtype=torch.bool)
    rounded[list(keep)] = False

    quant, final = gptq_quantize(w, h, 32, kept, block_size=block, dtype=torch.float64)
    assert torch.equal(quant.codes[:, rounded], codes[:, rounded])
    assert torch.equal(quant.scales, scales) and torch.equal(quant.zeros, zeros.int())
    assert (final - ref).abs().max() < 1e-9
    assert torch.equal(quant.dequantize()[:, rounded], final[:, rounded].float())
    if keep:  # the kept columns took errors: they moved
        assert (final[:, kept] - w[:, kept]).abs().max() > 1e-3

    quant32, final32 = gptq_quantize(w, h, 32, kept, block_size=block)
    assert torch.equal(quant32.codes[:, rounded], codes[:, rounded])
    assert (final32.double() - ref).abs().max() < 1e-4 * w.abs().max()
    rtn = quantize_groups(w, 32).dequantize()
    assert output_error(w, final32, h) < 0.8 * output_error(w, rtn, h)


@pytest.mark.parametrize("keep", [(), (3, 40, 41, 63)])
def test_act_order_matches_the_column_by_column_reference(keep: tuple[int, ...]) -> None:
    """Act-order (columns by decreasing H[i, i], static grids from the given weights): the float64 codes,
    grids and weights of the reference in that order. The order differs from the natural one here, and the
    output error stays below round-to-nearest's."""
    x = correlated_inputs(512, 64, seed=5)
    x[:, 9] = 0.0
    h = input_hessian([x.reshape(8, 64, 64)])
    assert not torch.equal(torch.argsort(h.diagonal(), descending=True), torch.arange(64))
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    codes, scales, zeros, ref = reference_gptq(w, h, 32, keep, act_order=True)
    kept = torch.tensor(keep, dtype=torch.int64) if keep else None
    rounded = torch.ones(64, dtype=torch.bool)
    rounded[list(keep)] = False
    quant, final = gptq_quantize(w, h, 32, kept, block_size=32, dtype=torch.float64, act_order=True)
    assert torch.equal(quant.codes[:, rounded], codes[:, rounded])
    assert torch.equal(quant.scales, scales) and torch.equal(quant.zeros, zeros.int())
    assert (final - ref).abs().max() < 1e-9
    natural, _ = gptq_quantize(w, h, 32, kept, block_size=32, dtype=torch.float64)
    assert not torch.equal(natural.codes, quant.codes)
    rtn = quantize_groups(w, 32).dequantize()
    assert output_error(w, final, h) < 0.8 * output_error(w, rtn, h)
    with pytest.raises(ValueError, match="inplace"):
        gptq_quantize(w, h, 32, kept, act_order=True, kept_order="inplace")
    with pytest.raises(UserError, match="act-order is an option of GPTQ"):
        QuantSpec("awq", act_order=True)
    with pytest.raises(UserError, match="rtn calibrates on nothing"):
        QuantSpec("rtn", quantized_inputs=True)


def test_the_grid_search_never_loses_to_min_max() -> None:
    """Per (row, group) the searched grid's importance-weighted rounding error is at most the min/max
    grid's, below it in most groups and 5% below it in all; no shrinking is the min/max grid; a
    column of importance 0 or skipped may fall outside the grid, so more grids shrink."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 4, 32, generator=gen)
    importance = torch.rand(1, 4, 32, generator=gen) + 0.1

    def weighted_error(scales: torch.Tensor, zeros: torch.Tensor, imp: torch.Tensor) -> torch.Tensor:
        codes = round_to_codes(w, scales.unsqueeze(-1), zeros.unsqueeze(-1))
        return (((codes - zeros.unsqueeze(-1)) * scales.unsqueeze(-1) - w) ** 2 * imp).sum(-1)

    searched = weighted_error(*search_group_params(w, importance), importance)
    plain = weighted_error(*group_params(w), importance)
    assert (searched <= plain).all()
    assert (searched < plain).float().mean() > 0.5 and searched.sum() < 0.95 * plain.sum()
    unshrunk = search_group_params(w, importance, max_shrink=0)
    assert all(torch.equal(a, b) for a, b in zip(unshrunk, group_params(w), strict=True))
    # With each group's largest weight unimportant, or skipped, more grids shrink.
    top = w.abs().argmax(dim=-1, keepdim=True)
    muted = importance.expand_as(w).scatter(-1, top, 0.0)
    skip = torch.zeros_like(w, dtype=torch.bool).scatter(-1, top, True)
    plain_scales = group_params(w)[0]
    shrunk = float((search_group_params(w, importance)[0] < plain_scales).float().mean())
    for scales, _ in (search_group_params(w, muted), search_group_params(w, importance, skip)):
        assert float((scales < plain_scales).float().mean()) > shrunk + 0.1


@pytest.mark.parametrize(("act_order", "keep"), [(False, ()), (False, (3, 40, 41, 63)), (True, (3, 40))])
def test_the_grid_search_matches_the_reference(act_order: bool, keep: tuple[int, ...]) -> None:
    """Grid search (each group's range shrunk for the least expected output error, a column's rounding
    weighted by 1 / Hinv[i, i] when it is eliminated): the float64 codes, grids and weights of the
    reference, on grids that differ from the min/max ones. (Whether that lowers the output error is the
    benchmark's question: on matrices this small the rounding's luck decides; bench/quality_matrix.sh.)"""
    x = correlated_inputs(512, 64, seed=7)
    h = input_hessian([x.reshape(8, 64, 64)])
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(16, 64, generator=gen)
    codes, scales, zeros, ref = reference_gptq(w, h, 32, keep, act_order, grid_search=True)
    kept = torch.tensor(keep, dtype=torch.int64) if keep else None
    rounded = torch.ones(64, dtype=torch.bool)
    rounded[list(keep)] = False
    run = {"block_size": 32, "dtype": torch.float64, "act_order": act_order}
    quant, final = gptq_quantize(w, h, 32, kept, grid_search=True, **run)
    assert torch.equal(quant.codes[:, rounded], codes[:, rounded])
    assert torch.equal(quant.scales, scales) and torch.equal(quant.zeros, zeros.int())
    assert (final - ref).abs().max() < 1e-9
    plain, _ = gptq_quantize(w, h, 32, kept, **run)
    assert not torch.equal(plain.scales, quant.scales)
    with pytest.raises(UserError, match="grid-search is an option of GPTQ"):
        QuantSpec("awq", grid_search=True)
    assert "grid_search" not in QuantSpec("gptq").record()
    assert QuantSpec("gptq", grid_search=True).record()["grid_search"] is True


def test_kept_columns_take_the_error_optimally() -> None:
    """Kept columns last: they end at the least-squares optimum given the rounded columns (the gradient
    of the damped output error vanishes there), which beats freezing them at their float values; frozen
    ("first") kept columns are exactly the float ones."""
    x = correlated_inputs(1024, 128, seed=3)
    h = input_hessian([x.reshape(8, 128, 128)])
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    keep = torch.tensor([1, 2, 33, 70, 127])
    _, last = gptq_quantize(w, h, 32, keep, dtype=torch.float64)
    gradient = ((w.double() - last) @ damped(h))[:, keep]
    assert gradient.abs().max() < 1e-9 * (w.double() @ damped(h)).abs().max()
    _, first = gptq_quantize(w, h, 32, keep, dtype=torch.float64, kept_order="first")
    assert torch.equal(first[:, keep], w[:, keep].double())
    assert output_error(w, last, damped(h)) < 0.95 * output_error(w, first, damped(h))


def linear_inputs(model: nn.Module, batch: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every decoder linear's inputs in the float model, per chunk of 8 sequences."""
    captured: dict[str, list[torch.Tensor]] = {}

    def capture(name: str):
        return lambda _module, args: captured.setdefault(name, []).append(args[0])

    handles = [
        module.register_forward_pre_hook(capture(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    ]
    with torch.no_grad():
        for chunk in batch.split(8):
            model.model(input_ids=chunk, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.no_grad()
def test_gptq_error_is_below_rtn_and_awq(arch: str, tokenizer) -> None:
    """Each linear's output error on the calibration inputs: GPTQ's < 0.9 x RTN's. The decoder's output
    error: AWQ + GPTQ's < 0.8 x AWQ's on the calibration text, and below it on held-out text."""
    calib, held = calib_and_eval(tokenizer)
    base = lively(build_tiny_model(arch, len(tokenizer)))
    inputs = linear_inputs(base, calib)
    gptq, rtn = copy.deepcopy(base), copy.deepcopy(base)
    quantized = quantize_model(gptq, calib, QuantSpec("gptq", group_size=32), progress=False)
    rtn_quantized = quantize_model(rtn, calib, QuantSpec("rtn", group_size=32), progress=False)
    for name, xs in inputs.items():
        w = base.get_submodule(name).weight
        # The model's linear now holds the weights its codes stand for.
        assert torch.equal(gptq.get_submodule(name).weight, quantized[name].quant.dequantize())
        errors = [
            sum(float((x @ (w - q).T).pow(2).sum()) for x in xs)
            for q in (gptq.get_submodule(name).weight, rtn_quantized[name].quant.dequantize())
        ]
        assert errors[0] < 0.9 * errors[1], (name, errors)

    batches = {"calib": calib, "held": held}
    reference = {k: base.model(input_ids=ids).last_hidden_state for k, ids in batches.items()}
    errors = {}
    for method in ("awq", "awq-gptq"):
        model = copy.deepcopy(base)
        install_quantized(
            model, quantize_model(model, calib, QuantSpec(method, group_size=32), progress=False)
        )
        for k, ids in batches.items():
            out = model.model(input_ids=ids).last_hidden_state
            errors[method, k] = float((out - reference[k]).pow(2).mean())
    assert errors["awq-gptq", "calib"] < 0.8 * errors["awq", "calib"], errors
    assert errors["awq-gptq", "held"] < errors["awq", "held"], errors


@pytest.mark.parametrize(("arch", "method"), [("llama", "gptq"), ("gemma3", "awq-gptq")])
@torch.no_grad()
def test_kept_neurons_are_exact_after_gptq(arch: str, method: str, tokenizer) -> None:
    """Dense W4 + FP16 residual gives each kept neuron's final weights, up to the residual's fp16 rounding:
    for gate/up rows the float (scaled) rows; for down columns the values GPTQ's updates left there (not the
    float ones; without AWQ's scales, the least-squares optimum given the rounded columns). Every other
    weight is the dequantized codes, exactly. The calibration sequences are weighted 1, 2, 1, 2, ...: the
    optimum is that of the weighted Hessian."""
    calib, _ = calib_and_eval(tokenizer)
    weights = torch.tensor([1.0, 2.0] * (len(calib) // 2), dtype=torch.float64)
    base = lively(build_tiny_model(arch, len(tokenizer)))
    inputs = linear_inputs(base, calib)
    model = copy.deepcopy(base)
    spec = QuantSpec(method, group_size=32)
    quantized = quantize_model(model, calib, spec, kept=KEPT, progress=False, weights=weights)
    for i, layer in enumerate(decoder_layers(model)):
        keep = KEPT[i]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.{proj}"
            q, final = quantized[name], getattr(layer.mlp, proj).weight.double()
            cols = proj == "down_proj"
            effective = W4Linear.from_quantized(q, "cols" if cols else "rows").dense_weight(torch.float64).T
            residual = q.sparse.double().T if cols else q.sparse.double()
            got, want = (effective[:, keep], final[:, keep]) if cols else (effective[keep], final[keep])
            assert torch.all((got - want).abs() <= (want - got + residual).abs() * 2**-11 + 2**-24), name
            others = torch.ones(final.shape[1 if cols else 0], dtype=torch.bool)
            others[keep] = False
            rest = (effective - final)[:, others] if cols else (effective - final)[others]
            assert torch.equal(rest, torch.zeros_like(rest)), name
            float_w = base.get_submodule(name).weight.double()
            if cols:  # compensated, not frozen
                assert (final[:, keep] - float_w[:, keep]).abs().max() > 1e-4, name
            if cols and method == "gptq":
                h = damped(input_hessian(inputs[name], list(weights.split(8))))
                gradient = ((float_w - final) @ h)[:, keep]
                assert gradient.abs().max() < 1e-4 * (float_w @ h).abs().max(), name
            elif method == "gptq":  # no scales: the kept rows are the float model's own
                assert torch.equal(final[keep], float_w[keep]), name


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_quantized_inputs_calibrate_each_layer_on_its_quantized_predecessors(arch: str, tokenizer) -> None:
    """With `quantized_inputs`, each layer's q_proj (its first linear: it reads the layer's input through
    the norm alone) is GPTQ-rounded with the Hessian of its inputs in the quantized model: the float
    weights and that Hessian give its codes again. Layer 0 equals the float-input run, a later layer does
    not. Several copies at once (kept neurons in one) each equal their own run alone."""
    calib, _ = calib_and_eval(tokenizer)
    base = lively(build_tiny_model(arch, len(tokenizer)))
    spec = QuantSpec("gptq", group_size=32, quantized_inputs=True)
    model = copy.deepcopy(base)
    quantized = quantize_model(model, calib, spec, progress=False)
    float_run = quantize_model(copy.deepcopy(base), calib, QuantSpec("gptq", group_size=32), progress=False)
    seen = linear_inputs(model, calib)  # every linear now holds the weights its 4-bit form stands for
    for i in range(len(decoder_layers(base))):
        name = f"model.layers.{i}.self_attn.q_proj"
        quant, _ = gptq_quantize(base.get_submodule(name).weight.float(), input_hessian(seen[name]), 32)
        assert torch.equal(quantized[name].quant.codes, quant.codes), name
        same_as_float = torch.equal(float_run[name].quant.codes, quant.codes)
        assert same_as_float == (i == 0), name

    both = [copy.deepcopy(base), copy.deepcopy(base)]
    together = quantize_models(both, calib, spec, [None, KEPT], progress=False)
    alone = quantize_model(copy.deepcopy(base), calib, spec, kept=KEPT, progress=False)
    for name, q in quantized.items():
        assert torch.equal(together[0][name].quant.codes, q.quant.codes), name
        assert torch.equal(together[1][name].quant.codes, alone[name].quant.codes), name
        if alone[name].sparse is not None:
            assert torch.equal(together[1][name].sparse, alone[name].sparse), name


def test_language_weights_in_the_hessian() -> None:
    """Token weights: weight 0 is leaving the sequence out, weight 2 is counting it twice (normalised by
    the weights' sum, not the token count)."""
    x = correlated_inputs(4 * 32, 16).reshape(4, 32, 16)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # float32 products, summed in float64
        return bool((a - b).abs().max() < 1e-6 * b.abs().max())

    assert close(input_hessian([x], [torch.ones(4)]), input_hessian([x]))
    dropped = input_hessian([x], [torch.tensor([1.0, 0.0, 1.0, 0.0])])
    assert close(dropped, input_hessian([x[[0, 2]]]))
    doubled = input_hessian([x[:2], x[2:]], [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])])
    assert close(doubled, input_hessian([torch.cat([x, x[:1]])]))
    assert not close(doubled, input_hessian([x]))


def test_language_weights_in_the_awq_searches() -> None:
    """AWQ's scale and clip searches with sequence weights: weight 0 is leaving the sequence out (to the
    float rounding of the sums), and the weights change the result."""
    gen = torch.Generator().manual_seed(6)
    x = correlated_inputs(2 * 32, 64, seed=7).reshape(2, 32, 64)
    x[1, :, :8] *= 30  # the second sequence has outlier channels of its own
    linears = [nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)]
    for linear in linears:
        linear.weight.data = torch.randn(32, 64, generator=gen)

    def scales(inputs: list[torch.Tensor], weights: list[torch.Tensor] | None) -> torch.Tensor:
        group = ScaleSearch(
            "test",
            nn.Linear(64, 64),
            linears,
            inputs,
            lambda _c, xs: torch.cat([linear(xs) for linear in linears], dim=-1),
            weights=weights,
        )
        return search_scales(group, 32)

    first = scales([x[:1]], None)
    assert torch.allclose(scales([x], [torch.tensor([1.0, 0.0])]), first, rtol=1e-5)
    assert not torch.allclose(scales([x], None), first, rtol=1e-2)
    clip = search_clip(linears[0], [x[:1]], 32)
    assert torch.allclose(search_clip(linears[0], [x], 32, weights=[torch.tensor([1.0, 0.0])]), clip)
    assert not torch.allclose(search_clip(linears[0], [x], 32), clip)


def test_language_weight_zero_is_calibrating_without_the_language(tokenizer) -> None:
    """ko weighted 0 in an en+ko mix is, exactly, calibrating on the mix's English sequences alone (with
    the same number of them): the same batch, unweighted, hence the same codes. Other weights keep every
    sequence and weigh it; weights are checked against the mix."""
    without_ko = CalibrationSpec(("en", "ko"), 8, 64, weights=(("ko", 0.0),))
    english = CalibrationSpec(("en",), 4, 64)
    batch, weights = weighted_calibration_batch(tokenizer, without_ko)
    assert weights is None and torch.equal(batch, calibration_batch(tokenizer, english))
    base = lively(build_tiny_model("qwen2", len(tokenizer)))
    spec = QuantSpec("awq-gptq", group_size=32)
    weighted = quantize_model(copy.deepcopy(base), batch, spec, progress=False, weights=weights)
    alone = quantize_model(copy.deepcopy(base), calibration_batch(tokenizer, english), spec, progress=False)
    for name, q in alone.items():
        assert torch.equal(weighted[name].quant.codes, q.quant.codes), name
        assert torch.equal(weighted[name].quant.scales, q.quant.scales), name

    half_ko = CalibrationSpec(("en", "ko"), 8, 64, weights=(("ko", 0.5),))
    batch, weights = weighted_calibration_batch(tokenizer, half_ko)
    assert torch.equal(batch, calibration_batch(tokenizer, half_ko))
    assert weights.tolist() == [1.0, 0.5] * 4
    with pytest.raises(UserError, match="not in the calibration languages"):
        CalibrationSpec(("en",), weights=(("ko", 2.0),))
    with pytest.raises(UserError, match="every calibration language weight 0"):
        CalibrationSpec(("en",), weights=(("en", 0.0),))


@torch.no_grad()
def test_gptq_opt_checkpoint_loads_back_to_the_same_logits(
    tiny_model_dir, tokenizer, tmp_path: Path, capsys
) -> None:
    """`quantize --method awq-gptq-opt --calib-weights ko=2,ja=0` on an en/ko/ja mix writes what the
    in-memory quantizer makes from the en/ko mix alone with Korean weighted 2 (weight 0 is leaving ja out,
    end to end) and the same kept neurons; the checkpoint runs to the same logits."""
    model_dir = tiny_model_dir("gemma3")
    neurons = neurons_file(model_dir, tmp_path / "n.safetensors")
    out = tmp_path / "ckpt"
    capsys.readouterr()
    code = main(
        [
            *("quantize", "--model", str(model_dir), "--method", "awq-gptq-opt", "--neurons", str(neurons)),
            *("--calib-langs", "en,ko,ja", "--calib-samples", "6", "--calib-seqlen", "64"),
            *("--calib-weights", "ko=2,ja=0", "--group-size", "32", "--vocab-bits", "16", "--out", str(out)),
            "--quiet",
        ]
    )
    assert code == 0 and "method awq-gptq-opt" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quant_spec"]["method"] == "awq-gptq"
    assert manifest["calibration"]["weights"] == [["ko", 2.0], ["ja", 0.0]]

    reference = build_tiny_model("gemma3", len(tokenizer))
    batch = calibration_batch(tokenizer, CalibrationSpec(("en", "ko"), 4, 64))
    weights = torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    quantized = quantize_model(reference, batch, QuantSpec("awq-gptq", group_size=32), KO, False, weights)
    install_quantized(reference, quantized)
    for p in reference.parameters():
        p.copy_(p.half().float())
    loaded = load_quantized_model(out)
    assert sum(isinstance(m, W4Linear) for m in loaded.modules()) == 14
    ids = calibration_batch(tokenizer, CalibrationSpec(("ja",), 2, 48))
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)
