"""Export of a real `slope train` run: the exported model equals the training side's own reload."""

from __future__ import annotations

import torch
from _export_fixtures import logits

import slope
from slope.cli import main
from slope.io.checkpoint import load_checkpoint
from slope.io.load import load, load_tokenizer


def test_export_of_a_tiny_training_run(tmp_path):
    run = tmp_path / "run"
    # 4 steps of the shipped smoke config; its adapter_start 0.75 adds adapters before the last step
    argv = ["train", "--config", "tiny", "--run-dir", str(run), "--no-progress",
            "--train.max_steps=4", "--eval.every=0", "--eval.sets=[]"]
    assert main(argv) == 0
    trained, tokenizer, _ = load_checkpoint(run)
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--dtype", "float32"]) == 0

    loaded = load(tmp_path / "e", device="cpu", backend="reference")
    assert all(layer.rank > 0 for _, layer in slope.slope_layers(loaded))
    ids = tokenizer("ROMEO: But soft, what light", return_tensors="pt")["input_ids"]
    assert torch.equal(logits(trained, ids), logits(loaded, ids))
    assert load_tokenizer(tmp_path / "e").get_vocab() == tokenizer.get_vocab()
