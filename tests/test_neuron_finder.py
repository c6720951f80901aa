"""The finder on tiny real-architecture models: planted Korean neurons are found, and only they are."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from conftest import ARCHITECTURES, build_tiny_model
from lape_awq.quant.architectures import decoder_layers
from lape_awq.quant.lape.activation_stats import count_positive_activations
from lape_awq.quant.lape.finder import SamplingSettings, find_language_neurons
from lape_awq.quant.lape.selection import LapeOptions
from lape_awq.quant.text_sources import DEFAULT_LANGUAGES, language_texts

HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]")
# (layer, neuron) pairs that fire exactly on Hangul tokens; first, last and a middle neuron.
PLANTED = {(0, 0), (0, 127), (1, 64)}
ALWAYS_ON = (1, 5)
D_HANGUL, D_CONST = 0, 1


def hangul_token_mask(tokenizer) -> torch.Tensor:
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([bool(HANGUL.search(t or "")) for t in tokens])


@torch.no_grad()
def plant_neurons(model: nn.Module, is_hangul: torch.Tensor) -> None:
    """Make the residual stream the embedding (attention and MLP outputs zeroed), then aim gate rows at
    a Hangul dimension (planted), a constant dimension (always on) or random directions (background)."""
    emb = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(1)
    emb.copy_(torch.randn(emb.shape, generator=gen))
    emb[:, D_HANGUL] = torch.where(is_hangul, 1.0, -1.0)
    emb[:, D_CONST] = 1.0
    for layer in decoder_layers(model):
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    for i, mlp in enumerate(layer.mlp for layer in decoder_layers(model)):
        gate = mlp.gate_proj.weight
        gate.copy_(torch.randn(gate.shape, generator=gen) / gate.shape[1] ** 0.5)
        gate[:, :2] = 0.0
        gate[:, D_CONST] = -1.0  # background neurons fire on a minority of tokens, in every language alike
        for layer_idx, j in PLANTED:
            if layer_idx == i:
                gate[j] = 0.0
                gate[j, D_HANGUL] = 1.0
        if ALWAYS_ON[0] == i:
            gate[ALWAYS_ON[1]] = 0.0
            gate[ALWAYS_ON[1], D_CONST] = 1.0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_planted_korean_neurons_are_found_exactly(arch: str, tokenizer) -> None:
    model = build_tiny_model(arch, len(tokenizer))
    plant_neurons(model, hangul_token_mask(tokenizer))
    texts = language_texts(list(DEFAULT_LANGUAGES), {})
    sampling = SamplingSettings(tokens_per_language=1500, seq_len=128, batch_size=4)
    result = find_language_neurons(model, tokenizer, texts, LapeOptions(), sampling, progress=False)

    assert result.tokens.tolist() == [1500] * len(DEFAULT_LANGUAGES)  # budget met, <bos> not counted
    ko = result.languages.index("ko")
    found = {tuple(x) for x in result.selection.language_mask[ko].nonzero().tolist()}
    assert found == PLANTED
    assert {tuple(x) for x in result.selection.selected.nonzero().tolist()} == PLANTED
    assert not result.selection.language_mask[[g for g in range(len(texts)) if g != ko]].any()
    probs = result.selection.probs
    assert probs[ALWAYS_ON][:].min() == 1.0  # fires on every token, so its entropy is maximal
    assert not result.selection.selected[ALWAYS_ON]
    for i, j in PLANTED:
        assert probs[i, j, ko] > 0.3 and probs[i, j].sum() == probs[i, j, ko]


def test_counts_match_direct_computation(tokenizer) -> None:
    """Hook counts equal act_fn(gate_proj(mlp input)) > 0 recomputed from captured MLP inputs."""
    model = build_tiny_model("gemma3", len(tokenizer), seed=3)
    batch = torch.randint(3, 5000, (3, 17), generator=torch.Generator().manual_seed(0))
    captured: list[torch.Tensor] = []
    mlps = [layer.mlp for layer in decoder_layers(model)]
    handles = [m.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for m in mlps]
    with torch.no_grad():
        model.model(input_ids=batch)
    for h in handles:
        h.remove()
    expected = torch.stack(
        [
            (m.act_fn(x[:, 1:] @ m.gate_proj.weight.T) > 0).sum(dim=(0, 1))
            for m, x in zip(mlps, captured, strict=True)
        ]
    )
    counts, tokens = count_positive_activations(model, [batch], skip_first_position=True)
    assert tokens == 3 * 16
    assert torch.equal(counts, expected)
    assert 0 < counts.sum() < counts.numel() * tokens
