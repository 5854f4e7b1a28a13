"""Files written before the package was restructured still load, to the same logits.

tests/io/fixtures/format1/ holds a training run's checkpoint and two compressed exports written by
slope 0.1.0 (see its README). The expected logits were computed when the files were written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slope

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
EXPECTED = load_file(FIXTURES / "expected_logits.safetensors")


@pytest.mark.parametrize("name", ["run", "export_llama", "export_gpt2"])
def test_old_files_load_to_the_same_logits(name):
    model = slope.load(FIXTURES / name, device="cpu", backend="reference")
    with torch.no_grad():
        logits = model(EXPECTED["input_ids"]).logits
    # Same float32 operands, same products: only a different summation order could move a logit,
    # by a few ulp of values of order 1 (1e-5 is ~100 ulp; a wrong mask or scale moves them by 1e-2+).
    torch.testing.assert_close(logits, EXPECTED[name], rtol=0, atol=1e-5)


def test_old_gpt2_export_keeps_biases_and_adapter_scale():
    model = slope.load(FIXTURES / "export_gpt2", device="cpu", backend="reference")
    layers = slope.slope_layers(model)
    assert layers and all(layer.adapter_scale == pytest.approx(0.37) for _, layer in layers)
    assert all(layer.bias is not None and layer.bias.abs().sum() > 0 for _, layer in layers)


def test_old_run_exports_and_evaluates(tmp_path):
    from slope.cli import main

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    model = slope.load(tmp_path / "export", device="cpu", backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(model(EXPECTED["input_ids"]).logits, EXPECTED["run"], rtol=0, atol=1e-5)
    assert main(["eval", str(run), "milton", "--max-tokens", "256", "--json"]) == 0
