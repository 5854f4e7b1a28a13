"""PEFT interop: LoRA on SlopeLinear against a float64 reference, "all-linear", and SLoPe adapters as a
PEFT adapter folder that PeftModel loads on the sparse and on the densified base."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _export_fixtures import logits, tiny_model
from _tolerances import assert_within, logits_atol, product_bound, unit_roundoff
from torch import nn

import slope
from slope.io.peft import (
    get_peft_model,
    load_peft_adapter,
    lora_alpha_for,
    prepare_lora_config,
    save_peft_adapter,
    strip_adapters,
)

peft = pytest.importorskip("peft", reason="peft is an optional dependency (pip install 'slope[peft]')")


def _one_layer(double_prune: bool = True) -> nn.Module:
    """One SlopeLinear (non-default: 2:4 double-pruned, random bias) inside a module PEFT can target."""
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(16, 8))
    with torch.no_grad():
        model.proj.bias.normal_(0, 0.3)
    cfg = slope.SlopeConfig(backend="reference", double_prune=double_prune, keep_first_linear_dense=False)
    return slope.sparsify(model, cfg)


def test_lora_on_slope_linear_matches_float64_reference():
    model = _one_layer()
    layer = model.proj
    w_r = layer.dense_weight().double()  # (out, in): W_R
    w_rc = layer.backward_weight().double()  # (out, in): W_RC, SLoPe's operand of grad_input
    bias = layer.bias.detach().double()
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], lora_dropout=0.0)
    wrapped = get_peft_model(model, config)
    lora = wrapped.base_model.model.proj
    from slope.io.peft import SlopeLoraLinear

    assert type(lora) is SlopeLoraLinear and lora.base_layer is layer
    with torch.no_grad():  # B starts at zero in LoRA; make it count
        lora.lora_B["default"].weight.normal_()
    a = lora.lora_A["default"].weight.detach().double()  # (r, in)
    b = lora.lora_B["default"].weight.detach().double()  # (out, r)
    s = 5 / 3

    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 8)
    y = wrapped(x)
    (y * g).sum().backward()

    x64, g64 = x.detach().double(), g.double()
    # float32 against float64: each product within product_bound of its exact value (the bound of two
    # float32 evaluations, so twice what one needs), the chained adapter product's first factor carried
    # through the second, plus the float32 rounding of the sums of the terms (2u of their sizes)
    u2 = 2 * unit_roundoff()
    xa = x64 @ a.t()
    y_ref = x64 @ w_r.t() + bias + s * xa @ b.t()
    y_bound = (product_bound(x64, w_r.t()) + s * (product_bound(x64, a.t()).abs() @ b.t().abs()
               + product_bound(xa, b.t())) + u2 * (bias.abs() + (x64 @ w_r.t()).abs() + s * (xa @ b.t()).abs()))
    assert_within(y, y_ref, y_bound, "y")
    gb = g64 @ b
    grad_b = s * g64.t() @ xa
    assert_within(lora.lora_B["default"].weight.grad, grad_b, s * (product_bound(g64.t(), xa)
                  + g64.t().abs() @ product_bound(x64, a.t())) + u2 * grad_b.abs(), "grad B")
    grad_a = s * gb.t() @ x64
    assert_within(lora.lora_A["default"].weight.grad, grad_a, s * (product_bound(gb.t(), x64)
                  + product_bound(g64, b).t().abs() @ x64.abs()) + u2 * grad_a.abs(), "grad A")
    dx_bound = (product_bound(g64, w_rc) + s * (product_bound(gb, a) + product_bound(g64, b).abs() @ a.abs())
                + u2 * ((g64 @ w_rc).abs() + s * (gb @ a).abs()))
    assert_within(x.grad, g64 @ w_rc + s * gb @ a, dx_bound, "grad x")
    # only the LoRA parameters train; the sparse base is frozen
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.proj.lora_A.default.weight", "base_model.model.proj.lora_B.default.weight"}
    assert layer.weight.grad is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_all_linear_wraps_every_slope_and_dense_linear_but_the_head(family):
    """GPT-2's linears are transformers' Conv1D (weight (in, out)): PEFT's "all-linear" counts them, and so
    must the prepared config, for the layers kept dense as for the sparse ones."""
    from transformers.pytorch_utils import Conv1D

    model = tiny_model(family)
    sparse = {name for name, _ in slope.slope_layers(model)}
    dense = {name for name, mod in model.named_modules() if isinstance(mod, nn.Linear | Conv1D)} - {"lm_head"}
    assert sparse and dense  # the first layer's attention input stays dense (keep_first_linear_dense)
    if family == "gpt2":
        assert all(isinstance(model.get_submodule(name), Conv1D) for name in dense)
    wrapped = get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear"))
    lora_layers = {name.removeprefix("base_model.model.") for name, mod in wrapped.named_modules()
                   if isinstance(mod, peft.tuners.lora.LoraLayer)}
    assert lora_layers == sparse | dense
    assert isinstance(wrapped.base_model.model.lm_head, nn.Linear)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(sparse | dense)


def test_plain_config_is_refused_by_peft_and_works_once_prepared():
    # What the hook is for: PEFT alone does not know SlopeLinear.
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["o_proj"]))
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, prepare_lora_config(peft.LoraConfig(target_modules=["o_proj"]), model))
    assert sum(type(m).__name__ == "SlopeLoraLinear" for m in wrapped.modules()) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plain_peft_all_linear_on_a_sparse_model_is_refused_at_the_first_training_forward(family, ids, tmp_path):
    """Plain PEFT's "all-linear" puts LoRA on the dense layers only and freezes the N:M ones: refused, for a
    sparsified model and for one slope.load gives back. A LoRA on chosen layers, and inference, pass."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "saved")
    for base in (model, slope.load(tmp_path / "saved", device="cpu")):
        wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules="all-linear"))
        assert not any(type(m).__name__ == "SlopeLoraLinear" for m in wrapped.modules())  # PEFT's own choice
        wrapped.eval()
        with torch.no_grad():
            wrapped(input_ids=ids)  # inference is not refused
        wrapped.train()
        with pytest.raises(ValueError, match=r"on none of the model's \d+ N:M \(SlopeLinear\) layers.*"
                                             r"slope\.get_peft_model\(model, config\)"):
            wrapped(input_ids=ids)
    dense = sorted(name for name, mod in tiny_model(family).named_modules()
                   if type(mod).__name__ in ("Linear", "Conv1D") and name != "lm_head")
    if len(dense) > 1:  # LLaMA keeps q, k and v of its first block dense; GPT-2 one fused c_attn
        chosen = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=2, target_modules=dense[:1]))
        chosen.train()
        chosen(input_ids=ids).logits.sum().backward()  # a deliberate subset of dense layers trains
    prepared = get_peft_model(tiny_model(family), peft.LoraConfig(r=2, target_modules="all-linear"))
    prepared.train()
    prepared(input_ids=ids).logits.sum().backward()


def test_an_adapter_folder_is_refused_on_a_base_that_already_holds_the_adapters(tmp_path):
    """The folder save_peft_adapter writes holds the adapters the model trained: applying it to the model
    itself, or to its dense export (adapters merged), would add them twice."""
    from transformers import AutoModelForCausalLM

    from slope.io.export import save_dense

    model = tiny_model("llama", adapters=True)
    save_peft_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"carry their own adapters.*strip_adapters"):
        load_peft_adapter(copy.deepcopy(model), tmp_path / "adapter")
    save_dense(model, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["slope_adapters_merged"] is True
    assert "count them twice" in (tmp_path / "dense" / "README.md").read_text()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"adapters merged into its weights.*count them twice"):
        load_peft_adapter(dense, tmp_path / "adapter")
    # the bases the folder is for: the sparse model without its adapters, and its dense export
    load_peft_adapter(strip_adapters(copy.deepcopy(model)), tmp_path / "adapter")
    save_dense(strip_adapters(copy.deepcopy(model)), tmp_path / "dense-base")
    load_peft_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "dense-base"), tmp_path / "adapter")


def test_a_config_that_is_not_a_lora_config_is_a_type_error():
    with pytest.raises(TypeError, match=r"the PEFT config must be a peft\.LoraConfig, got NoneType"):
        get_peft_model(tiny_model("llama"), None)


def test_merge_is_refused():
    wrapped = get_peft_model(_one_layer(), peft.LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(NotImplementedError, match="N:M weight dense"):
        wrapped.merge_and_unload()


@pytest.mark.parametrize("per_layer_scales", [False, True])
def test_slope_adapters_as_peft_folder_on_sparse_and_dense_base(tmp_path, ids, per_layer_scales):
    model = tiny_model("gpt2", adapters=True, per_layer_scales=per_layer_scales)
    with torch.no_grad():
        expected = logits(model, ids)
    folder = save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"]
    assert set(config["target_modules"]) == {name for name, _ in slope.slope_layers(model)}
    if per_layer_scales:
        assert config["alpha_pattern"]  # each layer its own scale

    sparse_base = strip_adapters(copy.deepcopy(model))
    assert not torch.allclose(logits(sparse_base, ids), expected)  # the adapters matter
    on_sparse = load_peft_adapter(sparse_base, folder).eval()
    torch.testing.assert_close(logits(on_sparse, ids), expected, rtol=0, atol=logits_atol(model, ids))

    dense_base = slope.densify(strip_adapters(copy.deepcopy(model))).eval()
    on_dense = peft.PeftModel.from_pretrained(dense_base, str(folder)).eval()  # plain PEFT, no slope hook
    torch.testing.assert_close(logits(on_dense, ids), expected, rtol=0, atol=logits_atol(model, ids))


def test_lora_alpha_gives_the_scale_exactly():
    import math

    for scale in (0.37, 1 / 3, 0.1, 1.0, 2.5e-3, 0.5 + 0.1 * 3):
        for rank in (1, 2, 4, 8, 64):  # powers of two: always exact
            assert lora_alpha_for(scale, rank) / rank == scale
        for rank in (3, 7, 12):
            assert abs(lora_alpha_for(scale, rank) / rank - scale) <= math.ulp(scale)


def test_save_peft_adapter_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        save_peft_adapter(tiny_model("llama"), tmp_path / "a")
