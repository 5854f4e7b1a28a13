"""`model.save_pretrained(dir)` of a sparsified model reloads with `slope.load(dir)` bit for bit; the compressed
export carries a top-level config.json and tokenizer; Trainer checkpoint-N/ folders resolve to their slope copy."""

from __future__ import annotations

import json

import pytest
import torch
from _export_fixtures import logits, tiny_model

import slope
from slope.io.export import save_compressed
from slope.io.format import FormatError
from slope.io.load import load_tokenizer, resolve_model_dir

# Non-default SlopeConfig: a loader that fell back to the defaults (scale 1/r, normal init, interval 1) is caught.
CFG = dict(backend="reference", adapter_init="kaiming", adapter_scale=0.37, backward_mask_interval=3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "neox"])
def test_save_pretrained_reloads_bit_exactly(tmp_path, ids, family):
    model = tiny_model(family, adapters=True, cfg=slope.SlopeConfig(**CFG))
    model.train()
    with torch.no_grad():  # one training-style forward so M_C and the step counters are not at their start values
        model(input_ids=ids)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    marker = json.loads((tmp_path / "m" / "config.json").read_text())["slope"]
    assert marker["format"] == "slope-state-dict" and marker["format_version"] == 1
    assert marker["slope_config"]["adapter_scale"] == 0.37

    loaded = slope.load(tmp_path / "m", device="cpu")
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n for n, _ in slope.slope_layers(loaded)} == {n for n, _ in slope.slope_layers(model)}
    assert {layer.config.backend for _, layer in slope.slope_layers(loaded)} == {"auto"}  # load's default
    forced = slope.load(tmp_path / "m", device="cpu", backend="reference")
    assert {layer.config.backend for _, layer in slope.slope_layers(forced)} == {"reference"}


def test_save_pretrained_in_bf16_keeps_the_dtype(tmp_path, ids):
    model = tiny_model("llama", adapters=True, cfg=slope.SlopeConfig(**CFG)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    loaded = slope.load(tmp_path / "m", device="cpu")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_densify_removes_the_marker(tmp_path):
    model = slope.densify(tiny_model("llama"))
    model.save_pretrained(tmp_path / "d")
    assert "slope" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert not slope.slope_layers(slope.load(tmp_path / "d", device="cpu"))


def test_newer_marker_and_wrong_weights_are_one_line_errors(tmp_path):
    model = tiny_model("llama", adapters=True)
    model.save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    config = json.loads(config_file.read_text())
    config["slope"]["format_version"] = 2
    config_file.write_text(json.dumps(config))
    with pytest.raises(FormatError, match=r"format_version 2 .*upgrade slope"):
        slope.load(tmp_path / "m", device="cpu")
    config["slope"]["format_version"] = 1
    config["num_hidden_layers"] = 1  # the weights hold layer 1, which this config does not build
    config_file.write_text(json.dumps(config))
    with pytest.raises(FormatError) as err:
        slope.load(tmp_path / "m", device="cpu")
    assert "\n" not in str(err.value) and "layers.1" in str(err.value)


def test_export_has_top_level_config_and_tokenizer(tmp_path, tokenizer):
    from transformers import AutoConfig, AutoTokenizer

    model = tiny_model("gpt2", adapters=True)
    out = save_compressed(model, tmp_path / "e", tokenizer, dtype=torch.float16)
    config = json.loads((out / "config.json").read_text())
    # golden keys: what tools reading the folder depend on
    assert config["model_type"] == "gpt2" and config["dtype"] == "float16"
    assert config["slope"] == {"format": "slope-compressed", "format_version": 2, "metadata": "slope_model.json"}
    assert AutoConfig.from_pretrained(out).model_type == "gpt2"
    assert AutoTokenizer.from_pretrained(out)("ROMEO:")["input_ids"] == tokenizer("ROMEO:")["input_ids"]
    meta = json.loads((out / "slope_model.json").read_text())
    assert meta["format_version"] == 2 and "config.json" in meta["files"] and "tokenizer.json" in meta["files"]
    assert resolve_model_dir(out).kind == "export"
    # transformers recognises the folder but must not load it: its weights are not in transformers'
    # layout, and under transformers' own file name it loaded every sparse layer randomly initialised
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match=r"no file named model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(out)
    (out / "slope_model.json").unlink()  # an incomplete export must not load as a (random) transformers model
    with pytest.raises(FormatError, match=r"slope_model\.json is missing"):
        slope.load(out, device="cpu")


def test_trainer_checkpoint_resolves_to_its_slope_copy(tmp_path, tokenizer, ids, capsys):
    from slope.cli import main

    model = tiny_model("llama", adapters=True)
    ckpt = tmp_path / "out" / "checkpoint-4"
    model.save_pretrained(ckpt)  # what transformers.Trainer writes ...
    save_compressed(model, ckpt / "slope", tokenizer)  # ... and SlopeCallback next to it
    assert resolve_model_dir(ckpt).path == ckpt / "slope"
    assert torch.equal(logits(slope.load(ckpt, device="cpu"), ids), logits(model, ids))
    assert load_tokenizer(ckpt)("x")["input_ids"] == tokenizer("x")["input_ids"]

    assert main(["export", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    assert torch.equal(logits(slope.load(tmp_path / "e", device="cpu"), ids), logits(model, ids))
    assert main(["generate", str(ckpt), "--prompt", "From", "--max-new-tokens", "3", "--temperature", "0",
                 "--device", "cpu", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("From")
    assert main(["eval", str(ckpt), "milton", "--max-tokens", "64", "--seq-len", "32", "--device", "cpu",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == str(ckpt / "slope") and result["results"]["milton"]["tokens"] > 0
