"""The stored masks and step counters of every sparse layer, checked by every reader with one function
(slope.io.format.mask_findings): `slope.load`, `load_checkpoint`, resume (`load_for_resume`) and `slope check`
refuse the same damage with the same words. Each file is changed and its checksums written again, so that
only the mask check can see the damage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _export_fixtures import reseal, reseal_export, resumable_state, tiny_model
from safetensors.torch import load_file, save_file

import slope
from slope.cli import main
from slope.io import checkpoint
from slope.io.format import FormatError, mask_findings

LAYER = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def trained():
    """A sparse model after one training step: M_C is computed, so its rules are checked too."""
    model = tiny_model("llama").train()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return model.eval()


@pytest.fixture
def run(tmp_path, trained, tokenizer):
    layers = slope.slope_layers(trained)
    info = {"method": "slope", "slope_config": layers[0][1].config.to_dict(), "adapters": False, "adapter_rank": None}
    checkpoint.save_checkpoint(tmp_path / "run", 4, trained, tokenizer, info, "", resumable_state(4, trained), 3)
    assert main(["check", str(tmp_path / "run")]) == 0
    return tmp_path / "run"


def _rewrite(ckpt: Path, key: str, change) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    reseal(ckpt)


def _set(bits: torch.Tensor, value: int) -> torch.Tensor:
    bits[0, 0] = value
    return bits


DAMAGE = {  # (tensor, change, the start of what the finding says)
    "row mask keeps 4 of 4": ("row_bits", lambda b: _set(b, 0b1111), "1 row group(s) of M_R do not keep exactly 2 of 4"),
    "row mask keeps 1 of 4": ("row_bits", lambda b: _set(b, 0b0001), "1 row group(s) of M_R do not keep exactly 2 of 4"),
    "row mask bit above m": ("row_bits", lambda b: _set(b, 0b10011), "1 row group(s) of M_R do not keep exactly 2 of 4"),
    "column mask keeps 4 of 4": ("col_bits", lambda b: _set(b, 0b1111),
                                 "1 column group(s) of M_C do not keep exactly 2 of 4"),
    "column step after the step count": ("mask_state", lambda s: torch.tensor([3, 5, 0]),
                                         "step counters (mask_steps=3, column_mask_step=5, rank=0) are invalid"),
    "negative step count": ("mask_state", lambda s: torch.tensor([-1, -1, 0]),
                            "step counters (mask_steps=-1, column_mask_step=-1, rank=0) are invalid"),
    "counters of another shape": ("mask_state", lambda s: torch.tensor([1, 0]),
                                  "the step counters (mask_state) are a torch.int64 tensor of shape (2,)"),
    "row mask of floats": ("row_bits", lambda b: b.float(), "row bits are a torch.float32 tensor"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_reader_refuses_damaged_masks(run, capsys, case):
    """Before: a row mask keeping 4 of 4 loaded and resumed; only `slope check` flagged it."""
    part, change, finding = DAMAGE[case]
    ckpt = run / "checkpoints" / "step_00000004"
    _rewrite(ckpt, f"{LAYER}.{part}", change)
    line = f"{ckpt / 'model.safetensors'}: {LAYER}: {finding}"
    with pytest.raises(FormatError, match=re.escape(line)) as resumed:
        checkpoint.load_for_resume(run)
    assert "\n" not in str(resumed.value)
    # loading: the strict load refuses bad counters first ("does not fit"), the mask check the rest
    loaded = re.escape(line) if part != "mask_state" else re.escape(f"{ckpt / 'model.safetensors'}")
    for read in (checkpoint.load_checkpoint, lambda p: slope.load(p, device="cpu")):
        with pytest.raises(FormatError, match=loaded) as err:
            read(run)
        assert "\n" not in str(err.value)
    capsys.readouterr()
    assert main(["check", str(run)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(line), out


def test_check_reports_what_the_loader_raises(run, capsys):
    """One function, one wording: the line `slope check` prints is the loader's error."""
    ckpt = run / "checkpoints" / "step_00000004"
    _rewrite(ckpt, f"{LAYER}.row_bits", lambda b: _set(b, 0b1111))
    with pytest.raises(FormatError) as err:
        checkpoint.load_checkpoint(ckpt)
    capsys.readouterr()
    assert main(["check", str(ckpt)]) == 1
    assert capsys.readouterr().out.splitlines()[0] == str(err.value)


def test_a_save_pretrained_folder_with_a_row_mask_keeping_4_of_4_is_refused(tmp_path, trained, capsys):
    trained.save_pretrained(tmp_path / "pretrained")
    assert main(["check", str(tmp_path / "pretrained")]) == 0
    weights = tmp_path / "pretrained" / "model.safetensors"
    tensors = load_file(weights)
    tensors[f"{LAYER}.row_bits"][0, 0] = 0b1111
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(FormatError, match=f"{LAYER}: 1 row group"):
        slope.load(tmp_path / "pretrained", device="cpu")
    assert main(["check", str(tmp_path / "pretrained")]) == 1


def test_an_export_is_checked_by_the_same_rules(tmp_path, trained, monkeypatch, capsys):
    """An export stores position codes, which unpack to exactly n of m: the check runs on what it builds."""
    out = slope.save_compressed(trained, tmp_path / "export")
    seen = []
    from slope.io import format as fmt

    real = fmt.mask_findings
    monkeypatch.setattr(fmt, "mask_findings", lambda *a: seen.append(a[1]) or real(*a))
    slope.load(out, device="cpu")
    assert f"{LAYER}." in seen
    meta = json.loads((out / "slope_model.json").read_text())
    assert meta["n"] == 2
    reseal_export(out)
    assert main(["check", str(out)]) == 0


def test_mask_findings_is_empty_for_every_layer_slope_writes(trained):
    state = trained.state_dict()
    for name, layer in slope.slope_layers(trained):
        assert mask_findings(state.get, f"{name}.", 2, 4, layer.config.double_prune) == []
