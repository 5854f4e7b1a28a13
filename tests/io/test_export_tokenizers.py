"""Every export ships a tokenizer that pads (with its end-of-text token) and knows the model's length limit,
read back with plain transformers; the caller's tokenizer is not changed."""

from __future__ import annotations

import pytest
from _export_fixtures import TEXT, tiny_model
from transformers import AutoTokenizer

import slope
from slope.train.tokenizing import train_bpe


@pytest.mark.parametrize("export", ["compressed", "dense", "serving"])
def test_exported_tokenizer_pads_and_has_the_models_length(tmp_path, export):
    model = tiny_model("llama", adapters=export == "serving")
    tokenizer = train_bpe(iter(TEXT), 320)  # the tokenizer `slope train` trains
    assert tokenizer.pad_token is None  # it has no padding token
    save = {"compressed": slope.save_compressed, "dense": slope.save_dense, "serving": slope.save_serving}[export]
    out = save(model, tmp_path / export, tokenizer)
    loaded = AutoTokenizer.from_pretrained(out)
    batch = loaded(["To be", "or not to be, that is"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and bool((batch["attention_mask"] == 0).any())
    assert loaded.pad_token == loaded.eos_token is not None
    assert loaded.model_max_length == model.config.max_position_embeddings
    assert tokenizer.pad_token is None  # the caller's tokenizer is untouched
