"""The architecture table against tiny models of every family it lists: each entry names modules that
exist, its scaling groups fold exactly (1/s into the smooth op, s into the balanced linears), and a layer
missing a module is refused."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_FAMILIES, build_tiny_model
from lape_awq.quant.architectures import ARCHITECTURES, GEMMA, architecture_of, decoder_layers
from lape_awq.quant.awq.search import ScaleSearch, apply_scales
from lape_awq.quant.errors import UserError

VOCAB = 1000


def test_every_family_has_a_tiny_model_here() -> None:
    """A family added to the table without a test model here would go untested."""
    families = {build_tiny_model(f, VOCAB).config.model_type for f in ALL_FAMILIES}
    assert families == set(ARCHITECTURES)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_scaling_groups_fold_exactly(family: str, kv_heads: int) -> None:
    """Every scaling group of the family's entry folds exactly: its smooth op (a norm, Gemma's 1 + w norm,
    or a linear) and its balanced linears together compute what they computed before; v -> o only
    applies without GQA."""
    model = build_tiny_model(family, VOCAB, num_key_value_heads=kv_heads).double()
    ids = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    table = architecture_of(model)
    gen = torch.Generator().manual_seed(0)
    folded = set()
    for layer in decoder_layers(model):
        for group in table.scaling:
            smooth = layer.get_submodule(group.smooth)
            balanced = [layer.get_submodule(name) for name in group.balance]
            if group.needs_matching_shapes and balanced[0].weight.shape != smooth.weight.shape:
                continue
            search = ScaleSearch(group.name, smooth, balanced, [], None, table.norm_weight_offset)
            apply_scales(
                search, torch.rand(balanced[0].in_features, generator=gen, dtype=torch.float64) * 3 + 0.1
            )
            folded.add(group.name)
    assert folded == ({"qkv", "gate_up", "down"} | ({"vo"} if kv_heads == 4 else set()))
    # Gemma's RMSNorm computes in float32 even in a float64 model; a wrong fold is off by O(0.1).
    tolerance = 1e-6 if table is GEMMA else 1e-9
    assert torch.allclose(logits(model, ids), before, rtol=0, atol=tolerance)


def test_a_layer_missing_a_module_is_refused() -> None:
    model = build_tiny_model("llama", VOCAB)
    del model.model.layers[1].mlp.up_proj
    expected = r"unsupported architecture LlamaForCausalLM \(layer 1: no mlp\.up_proj\)"
    with pytest.raises(UserError, match=expected):
        architecture_of(model)


def test_an_unknown_family_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UserError, match=r"unsupported architecture GPT2LMHeadModel \(model_type 'gpt2'"):
        architecture_of(model)
