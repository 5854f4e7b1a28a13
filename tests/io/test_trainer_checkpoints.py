"""A real transformers.Trainer run with SlopeCallback: its checkpoint-N/ folders load, export, evaluate and
generate; and the Trainer's own save_pretrained copy in checkpoint-N/ (without slope/) reloads bit for bit."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import slope
from slope.io.load import resolve_model_dir

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (pip install 'slope[hf-trainer]')")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("hf_trainer_example_io", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("trainer") / "out"
    trainer, _ = module.build([
        "--output-dir", str(out), "--max-steps", "4", "--adapter-start", "0.5",
        "--chars", "20000", "--seq-len", "32", "--batch-size", "2", "--save-steps", "2",
    ])
    trainer.train()
    model = trainer.model.eval()
    ids = torch.arange(1, 17).view(1, 16)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.cpu()
    return out, ids, expected


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_checkpoint_folder_is_read_through_its_slope_copy(trained, tmp_path, capsys):
    from slope.cli import main

    out, ids, expected = trained
    ckpt = out / "checkpoint-4"
    assert resolve_model_dir(ckpt).path == ckpt / "slope"
    readme = (ckpt / "README.md").read_text()  # what plain transformers cannot read says how to load it
    assert 'slope.load("checkpoint-4")' in readme and "from_pretrained" in readme
    assert torch.equal(_logits(slope.load(ckpt, device="cpu", backend="reference"), ids), expected)
    assert main(["export", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    assert torch.equal(_logits(slope.load(tmp_path / "e", device="cpu"), ids), expected)
    assert main(["generate", str(ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "4", "--temperature", "0",
                 "--device", "cpu", "--no-stream"]) == 0
    capsys.readouterr()
    assert main(["eval", str(ckpt), "milton", "--max-tokens", "64", "--seq-len", "32", "--device", "cpu",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["milton"]["tokens"] > 0


def test_trainers_own_save_pretrained_copy_reloads_bit_for_bit(trained, tmp_path):
    out, ids, expected = trained
    copy = tmp_path / "checkpoint-4"
    shutil.copytree(out / "checkpoint-4", copy)
    shutil.rmtree(copy / "slope")  # only what transformers.Trainer itself wrote
    assert json.loads((copy / "config.json").read_text())["slope"]["format"] == "slope-state-dict"
    loaded = slope.load(copy, device="cpu", backend="reference")
    assert any(layer.rank for _, layer in slope.slope_layers(loaded))
    assert torch.equal(_logits(loaded, ids), expected)
