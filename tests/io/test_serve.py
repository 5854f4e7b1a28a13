"""The serving export: a plain transformers base that keeps exactly 2 of every 4 weights of each sparse layer,
and the SLoPe adapters as a PEFT LoRA folder; base + adapter reproduce slope's model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _export_fixtures import logits, tiny_model
from _tolerances import logits_atol

import slope
from slope.io.export import save_compressed
from slope.io.peft import strip_adapters
from slope.io.serve import save_serving

peft = pytest.importorskip("peft", reason="peft is an optional dependency (pip install 'slope[serve]')")


def _dense_weight(module) -> torch.Tensor:
    """(out, in) of an nn.Linear or a GPT-2 Conv1D (stored (in, out))."""
    return module.weight.detach().t() if type(module).__name__ == "Conv1D" else module.weight.detach()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_serving_export_base_and_adapter(tmp_path, tokenizer, ids, family):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, adapters=True, per_layer_scales=True)
    out = save_serving(model, tmp_path / "serve", tokenizer)

    base = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers alone
    sparse_base = strip_adapters(copy.deepcopy(model))
    for name, layer in slope.slope_layers(model):
        weight = _dense_weight(base.get_submodule(name))  # (out, in)
        assert torch.equal(weight, layer.dense_weight())
        nonzero = weight.reshape(layer.out_features, -1, 4).ne(0).sum(-1)
        assert (nonzero == 2).all(), name  # every group of 4 keeps exactly 2
    # plain layers and the sparse path sum in other orders: within the bound on that (tests/_tolerances.py)
    torch.testing.assert_close(logits(base, ids), logits(sparse_base, ids), rtol=0, atol=logits_atol(sparse_base, ids))

    with_adapter = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    torch.testing.assert_close(logits(with_adapter, ids), logits(model, ids), rtol=0, atol=logits_atol(model, ids))

    # slope.load rebuilds the SLoPe model: the same masks, kept values and adapters
    rebuilt = slope.load(out, device="cpu", backend="reference")
    for (name, layer), (name2, again) in zip(slope.slope_layers(model), slope.slope_layers(rebuilt), strict=True):
        assert name == name2 and torch.equal(layer.row_bits, again.row_bits)
        assert torch.equal(layer.weight, again.weight) and layer.adapter_scale == again.adapter_scale
        assert torch.equal(layer.adapter_a, again.adapter_a) and torch.equal(layer.adapter_b, again.adapter_b)
    assert torch.equal(logits(rebuilt, ids), logits(model, ids))


def test_serving_export_of_a_model_without_adapters(tmp_path, tokenizer, ids, capsys):
    """A run stopped before its adapters joined (or a `--method srste` model) serves as the base alone: no
    adapter folder, no adapter named in the marker, and slope.load gives back the sparse model exactly."""
    from transformers import AutoModelForCausalLM

    from slope import cli

    model = tiny_model("gpt2")
    assert not any(layer.rank for _, layer in slope.slope_layers(model))
    out = save_serving(model, tmp_path / "serve", tokenizer)
    assert not (out / "adapter").exists()
    assert json.loads((out / "config.json").read_text())["slope"]["adapter"] is None
    base = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(base, ids), logits(model, ids), rtol=0, atol=logits_atol(model, ids))
    rebuilt = slope.load(out, device="cpu", backend="reference")
    assert {n for n, _ in slope.slope_layers(rebuilt)} == {n for n, _ in slope.slope_layers(model)}
    assert not any(layer.rank for _, layer in slope.slope_layers(rebuilt))
    assert torch.equal(logits(rebuilt, ids), logits(model, ids))
    assert cli.main(["check", str(out)]) == 0, capsys.readouterr().err


def test_serving_export_in_float64_matches_slope_exactly(tmp_path, ids):
    """Float64 all the way: any transposition or scaling slip would show far above rounding."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", adapters=True, per_layer_scales=True).double()
    out = save_serving(model, tmp_path / "serve")
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    served = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert next(served.parameters()).dtype == torch.float64
    torch.testing.assert_close(logits(served, ids), logits(model, ids), rtol=0,
                               atol=logits_atol(model, ids, torch.float64))


def test_serving_config_golden_keys(tmp_path, tokenizer):
    pytest.importorskip("compressed_tensors")
    model = tiny_model("llama", adapters=True)
    out = save_serving(model, tmp_path / "serve", tokenizer, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # current vLLM refuses a Sparse24 quantization_config
    meta = config["slope"]
    layers = [name for name, _ in slope.slope_layers(model)]
    assert meta["format"] == "slope-serve" and meta["format_version"] == 1
    assert (meta["n"], meta["m"], meta["adapter"], meta["sparse_layers"]) == (2, 4, "adapter", layers)
    assert meta["slope_config"] == slope.slope_layers(model)[0][1].config.replace(backend="auto").to_dict()
    sparsity = meta["sparsity_config"]
    assert sparsity == {"format": "dense", "targets": layers, "ignore": None, "sparsity_structure": "2:4",
                        "global_sparsity": sparsity["global_sparsity"]}
    # compressed-tensors reads its own config back
    from compressed_tensors.config import SparsityCompressionConfig

    parsed = SparsityCompressionConfig.load_from_registry(sparsity["format"], **sparsity)
    assert type(parsed).__name__ == "DenseSparsityConfig" and parsed.sparsity_structure == "2:4"
    dense_params = sum(p.numel() for p in slope.densify(strip_adapters(copy.deepcopy(model))).parameters())
    pruned = sum(layer.weight.numel() for _, layer in slope.slope_layers(model))
    assert sparsity["global_sparsity"] == pytest.approx(pruned / dense_params)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["task_type"] == "CAUSAL_LM"
    assert sorted(adapter["target_modules"]) == sorted(layers)
    from safetensors import safe_open

    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118 (safe_open is not iterable)


def test_slope_export_serve_cli(tmp_path, tokenizer, ids, capsys):
    from transformers import AutoModelForCausalLM

    from slope.cli import main

    model = tiny_model("gpt2", adapters=True)
    exported = save_compressed(model, tmp_path / "e", tokenizer)
    assert main(["export", str(exported), "--out", str(tmp_path / "s"), "--serve"]) == 0
    served = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "s"),
                                            str(tmp_path / "s" / "adapter")).eval()
    torch.testing.assert_close(logits(served, ids), logits(model, ids), rtol=0, atol=logits_atol(model, ids))
    with pytest.raises(SystemExit) as stop:  # argparse: the two forms exclude each other
        main(["export", str(exported), "--out", str(tmp_path / "x"), "--serve", "--dense"])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    # and back: the serving export re-exports to the compressed form with the same logits
    assert main(["export", str(tmp_path / "s"), "--out", str(tmp_path / "c")]) == 0
    assert torch.equal(logits(slope.load(tmp_path / "c", device="cpu"), ids),
                       logits(slope.load(tmp_path / "s", device="cpu"), ids))
