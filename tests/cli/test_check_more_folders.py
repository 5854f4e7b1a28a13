"""`slope check` on the folders its help names besides runs and checkpoints: a serving export (its dense base
must be exactly n:m where the marker says sparse, its adapter must load), a Trainer `checkpoint-N/`, and a
sparsified model's `save_pretrained` folder. Through the real command line."""

from __future__ import annotations

import shutil

import pytest
from _export_fixtures import make_tokenizer, tiny_model
from safetensors.torch import load_file, save_file

import slope
from slope.cli import main


def _weights_file(folder):
    (path,) = folder.glob("model*.safetensors")
    return path


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_serving_export_is_checked_for_exact_2_4(tmp_path, capsys, family):
    served = slope.save_serving(tiny_model(family, adapters=True), tmp_path / "serve", make_tokenizer())
    assert main(["check", str(served)]) == 0
    assert "OK:" in capsys.readouterr().out
    # one more nonzero in a group of a sparse layer: the base no longer is what was trained
    path = _weights_file(served)
    state = load_file(path)
    name = next(k for k in state if k.endswith(".weight") and ("mlp" in k or "c_fc" in k) and state[k].dim() == 2)
    weight = state[name]
    zero = (weight == 0).nonzero()[0]
    weight[tuple(zero)] = 0.5
    save_file(state, path, metadata={"format": "pt"})
    assert main(["check", str(served)]) == 1
    out = capsys.readouterr().out
    assert "1 group(s) keep more than 2 nonzero of 4" in out and "FAILED" in out


def test_serving_export_without_adapters_and_a_broken_adapter(tmp_path, capsys):
    plain = slope.save_serving(tiny_model("llama"), tmp_path / "plain", make_tokenizer())
    assert main(["check", str(plain)]) == 0
    capsys.readouterr()
    served = slope.save_serving(tiny_model("llama", adapters=True), tmp_path / "serve", make_tokenizer())
    (adapter,) = served.glob("*/adapter_model.safetensors")
    state = load_file(adapter)
    key = next(k for k in state if "lora_A" in k)
    state[key] = state[key][:2]  # a rank that does not match the config
    save_file(state, adapter)
    assert main(["check", str(served)]) == 1
    assert "adapter shapes" in capsys.readouterr().out


def test_trainer_checkpoint_and_save_pretrained_folders(tmp_path, capsys):
    model = tiny_model("llama", adapters=True)
    export = slope.save_compressed(model, tmp_path / "export", make_tokenizer())
    trainer_checkpoint = tmp_path / "checkpoint-10"
    trainer_checkpoint.mkdir()
    shutil.copytree(export, trainer_checkpoint / "slope")
    assert main(["check", str(trainer_checkpoint)]) == 0
    assert "OK:" in capsys.readouterr().out
    model.save_pretrained(tmp_path / "pretrained")
    assert main(["check", str(tmp_path / "pretrained")]) == 0
    assert "1 folder checked" in capsys.readouterr().out
    # an ordinary transformers folder is not slope's to check
    from _export_fixtures import tiny_config
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "plain_hf")
    assert main(["check", str(tmp_path / "plain_hf")]) == 2
    assert "save_pretrained or `slope export --serve`" in capsys.readouterr().err

