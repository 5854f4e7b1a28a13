"""Every export writes a README.md model card: what the model is, its N:M sparsity and adapters, and how to
load that kind of folder. `slope check` passes with it (the compressed export's checksums cover it)."""

from __future__ import annotations

import pytest
from _export_fixtures import make_tokenizer, tiny_model

import slope
from slope.cli import main


@pytest.mark.parametrize(("kind", "how"), [
    ("compressed", "slope.load("), ("dense", "AutoModelForCausalLM.from_pretrained("), ("serving", "vllm serve"),
])
def test_every_export_has_a_model_card(tmp_path, capsys, kind, how):
    model = tiny_model("gpt2", adapters=True)
    save = {"compressed": slope.save_compressed, "dense": slope.save_dense, "serving": slope.save_serving}[kind]
    out = save(model, tmp_path / kind, make_tokenizer())
    card = (out / "README.md").read_text()
    assert how in card and "gpt2" in card
    layers = slope.slope_layers(model)
    assert f"{len(layers)} linear layers are 2:4 sparse" in card and "rank 4" in card
    if kind != "dense":
        assert main(["check", str(out)]) == 0
        assert "OK:" in capsys.readouterr().out
