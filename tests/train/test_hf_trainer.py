"""The Trainer callback through the example script: sparse from the start, adapters at the right step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

import slope
from slope.io.load import load
from slope.train.hf_trainer import SlopeCallback

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'slope[hf-trainer]')")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordAdapters(TrainerCallback):
    """Whether adapters exist as each optimizer step begins (steps numbered from 0)."""

    def __init__(self) -> None:
        self.had_adapters: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.had_adapters.append(any(layer.rank for _, layer in slope.slope_layers(model)))


def test_example_trains_and_adds_adapters_at_the_right_step(tmp_path):
    trainer, callback = _example().build([
        "--output-dir", str(tmp_path / "out"), "--max-steps", "4", "--adapter-start", "0.5",
        "--chars", "20000", "--seq-len", "32", "--batch-size", "2", "--save-steps", "2",
    ])
    model = trainer.model
    layers = slope.slope_layers(model)
    assert layers, "sparsified when the Trainer was built"
    recorder = RecordAdapters()
    trainer.add_callback(recorder)
    trainer.train()

    assert callback.adapters_added_at == 2
    assert recorder.had_adapters == [False, False, True, True]
    # the callback tracks the Trainer's optimizer (inside accelerate's wrapper): every step counted
    assert [layer.mask_steps for _, layer in layers] == [4] * len(layers)
    adapters = {id(p) for _, layer in layers for p in (layer.adapter_a, layer.adapter_b)}
    groups = trainer.optimizer.param_groups
    assert {id(p) for p in groups[-1]["params"]} == adapters
    # the adapters' group follows the Trainer's schedule like every other group
    assert groups[-1]["lr"] == pytest.approx(groups[0]["lr"])
    assert len(trainer.lr_scheduler.get_last_lr()) == len(groups)
    assert all(layer.adapter_b.abs().sum() > 0 for _, layer in layers), "adapters trained for two steps"
    for _, layer in layers:  # still 2:4: at most 2 non-zeros in every group of 4 along `in`
        assert (layer.dense_weight().view(layer.out_features, -1, 4) != 0).sum(-1).max() <= 2

    out = tmp_path / "out"
    assert (out / "checkpoint-2" / "slope" / "slope_model.json").is_file()
    loaded = load(out / "slope-export", device="cpu", backend="reference")
    ids = torch.arange(1, 17).view(1, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits.cpu())


def test_callback_rejects_a_prebuilt_dense_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    module = _example()
    model = module.LlamaForCausalLM(module.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ))
    opt = torch.optim.AdamW(model.parameters())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="optimizer built on the dense model"):
        Trainer(model=model, args=args, optimizers=(opt, None), callbacks=[SlopeCallback()])
