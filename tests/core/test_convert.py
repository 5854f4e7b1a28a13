"""sparsify / add_adapters / densify on real transformers models built from tiny configs."""

import logging

import pytest
import torch
from _tolerances import logits_atol
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import slope
from slope import SlopeConfig, SlopeLinear
from slope.masks import nm_mask

VOCAB = 128
SMALL = {"vocab_size": VOCAB}


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(**SMALL, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    if family == "opt":
        return OPTForCausalLM(OPTConfig(**SMALL, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64))
    raise ValueError(family)


FAMILIES = ["llama", "gpt2", "opt", "mistral", "qwen2"]
# the linear layers reading the model's input, found by tracing a forward pass
FIRST = {
    "llama": {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"},
    "mistral": {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"},
    "qwen2": {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"},
    "gpt2": {"transformer.h.0.attn.c_attn"},
    "opt": {f"model.decoder.layers.0.self_attn.{p}_proj" for p in "qkv"},
}


def train(model, steps=12, lr=3e-3, extra=None):
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, VOCAB, (4, 16), generator=gen)
    opt = slope.track_steps(torch.optim.AdamW(model.parameters(), lr=lr))
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses, opt


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_and_trains(family, caplog):
    model = tiny(family)
    with caplog.at_level(logging.INFO, logger="slope"):
        slope.sparsify(model)
    report = model.slope_report
    assert "linear layers converted to 2:4 SlopeLinear" in caplog.text
    assert {n for n, r in report.skipped.items() if r == "first linear after the input"} == FIRST[family]
    assert report.skipped["lm_head"] == "matches skip pattern 'lm_head'"
    layers = slope.slope_layers(model)
    assert len(layers) == len(report.converted) > 0
    assert report.params_after < report.params_before
    losses, _ = train(model)
    assert losses[-1] < losses[0] - 0.5, losses
    for _, layer in layers:  # the static mask survives training
        assert (layer.dense_weight()[~layer.row_mask()] == 0).all()


def test_sparsified_model_matches_masked_dense_model():
    model = tiny("llama")
    reference = tiny("llama").double()
    slope.sparsify(model.double())
    for name, layer in slope.slope_layers(model):
        # W_R from the dense weight itself (the same init), not from what the layer stored
        weight = reference.get_submodule(name).weight.data
        weight.mul_(nm_mask(weight, 2, 4))
        assert torch.equal(layer.dense_weight(), weight)
    ids = torch.randint(0, VOCAB, (2, 12))
    # the same float64 products summed in other orders: within logits_atol (tests/_tolerances.py)
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0,
                               atol=logits_atol(reference, ids, torch.float64))


def test_skip_patterns_and_no_first_layer_rule():
    model = tiny("llama")
    slope.sparsify(model, SlopeConfig(skip=("lm_head", "*mlp.down_proj"), keep_first_linear_dense=False))
    assert set(model.slope_report.skipped) == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert isinstance(model.model.layers[0].self_attn.q_proj, SlopeLinear)


def test_plain_module_uses_registration_order():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 8))
    slope.sparsify(model)
    assert model.slope_report.skipped == {"0": "first linear after the input"}
    assert model.slope_report.first_linear_method == "first in registration order"
    assert isinstance(model[2], SlopeLinear) and isinstance(model[3], SlopeLinear)


def test_indivisible_layers_skip_with_one_warning_or_error(caplog):
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 6), nn.Linear(6, 8))
    with caplog.at_level(logging.WARNING, logger="slope"):
        slope.sparsify(model)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 (out=6, in=32)" in warnings[0].message and "3 (out=8, in=6)" in warnings[0].message
    assert isinstance(model[1], SlopeLinear) and isinstance(model[2], nn.Linear)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 6))
    with pytest.raises(ValueError, match=r"2 \(out=6, in=32\).*on_indivisible='skip'"):
        slope.sparsify(model, SlopeConfig(on_indivisible="error"))


def test_nothing_to_convert_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to sparsify in Embedding"):
        slope.sparsify(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="all 1 linear layers are skipped"):
        slope.sparsify(nn.Sequential(nn.Linear(8, 8)))


def test_sparsify_twice_is_an_error():
    model = tiny("llama")
    slope.sparsify(model)
    with pytest.raises(ValueError, match="already has SlopeLinear layers"):
        slope.sparsify(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_add_adapters_keeps_output_joins_optimizer_and_trains(family):
    model = slope.sparsify(tiny(family))
    _, opt = train(model, steps=3)
    ids = torch.randint(0, VOCAB, (2, 10))
    model.eval()  # GPT-2 has dropout
    before = model(input_ids=ids).logits.detach()
    values = [layer.weight.detach().clone() for _, layer in slope.slope_layers(model)]
    groups = len(opt.param_groups)
    new = slope.add_adapters(model, rank=4, optimizer=opt, param_group={"lr": 1e-2})
    assert len(opt.param_groups) == groups + 1 and opt.param_groups[-1]["lr"] == 1e-2
    assert len(new) == 2 * len(slope.slope_layers(model))
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    model.train()
    batch = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.abs().sum() > 0 for p in new[1::2])  # every B moved
    moved = [not torch.equal(v, layer.weight) for v, (_, layer) in zip(values, slope.slope_layers(model), strict=True)]
    assert all(moved)  # the sparse weights keep training alongside the adapters
    with pytest.raises(RuntimeError, match="already added"):
        slope.add_adapters(model)


def test_add_adapters_rank_from_config():
    model = slope.sparsify(tiny("llama"), SlopeConfig(adapter_rank_ratio=0.0625))
    slope.add_adapters(model)
    # 6.25 % of each layer's smaller side: 64 -> 4, the 32-wide k/v projections -> 2
    ranks = {name.rsplit(".", 1)[-1]: layer.rank for name, layer in slope.slope_layers(model)}
    assert ranks == {"q_proj": 4, "k_proj": 2, "v_proj": 2, "o_proj": 4, "gate_proj": 4, "up_proj": 4, "down_proj": 4}


def test_add_adapters_needs_slope_layers():
    with pytest.raises(ValueError, match=r"no SlopeLinear layers; call slope\.sparsify"):
        slope.add_adapters(tiny("llama"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_densify_gives_plain_layers_with_same_output(family):
    model = slope.sparsify(tiny(family))
    train(model, steps=2)
    slope.add_adapters(model, rank=2)
    for _, layer in slope.slope_layers(model):
        layer.adapter_b.data.normal_()
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    before = model(input_ids=ids).logits.detach()
    slope.densify(model)
    assert not slope.slope_layers(model) and not hasattr(model, "slope_report")
    # plain layers sum in other orders than the sparse path: within logits_atol (tests/_tolerances.py)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=logits_atol(model, ids))
    with pytest.raises(ValueError, match="no SlopeLinear layers"):
        slope.densify(model)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: slope.sparsify(None), "sparsify: model must be a torch.nn.Module, got NoneType"),
    (lambda: slope.sparsify(tiny("llama"), {"m": 4}), "sparsify: config must be a slope.SlopeConfig or None, got dict"),
    (lambda: slope.add_adapters(slope.sparsify(tiny("llama")), optimizer="adamw"),
     "add_adapters: optimizer must be a torch.optim.Optimizer or None, got str"),
    (lambda: slope.add_adapters(slope.sparsify(tiny("llama")), rank="4"), "add_adapters: rank must be an int or None, got str"),
    (lambda: slope.add_adapters(slope.sparsify(tiny("llama")), rank=True), "add_adapters: rank must be an int or None, got bool"),
    (lambda: slope.densify("model"), "densify: model must be a torch.nn.Module, got str"),
])
def test_api_misuse_is_a_type_error_naming_the_argument(call, message):
    with pytest.raises(TypeError) as err:
        call()
    assert str(err.value) == message


def test_densify_in_training_warns_that_old_optimizers_stop_updating(caplog):
    model = slope.sparsify(tiny("llama"))
    with caplog.at_level(logging.WARNING, logger="slope"):
        slope.densify(model)  # a fresh model is in training mode
    assert "an optimizer built before densify no longer updates them" in caplog.text
    caplog.clear()
    model = slope.sparsify(tiny("llama")).eval()
    with caplog.at_level(logging.WARNING, logger="slope"):
        slope.densify(model)
    assert "optimizer" not in caplog.text
