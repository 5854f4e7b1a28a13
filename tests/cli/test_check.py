"""`slope check`: checksums of checkpoints and exports, the mask invariants of every sparse layer, one line per
finding, exit 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _export_fixtures import make_tokenizer, resumable_state, tiny_model
from safetensors.torch import load_file, save_file

import slope
from slope.cli import main
from slope.io import checkpoint
from slope.io.format import file_digests

LAYER = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def trained():
    """A sparse model after one training step: M_C is computed, so its invariants are checked too."""
    model = tiny_model("llama").train()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.column_mask_step == 0 for _, layer in slope.slope_layers(model))
    return model.eval()


@pytest.fixture
def run(tmp_path, trained, tokenizer):
    layers = slope.slope_layers(trained)
    info = {"method": "slope", "slope_config": layers[0][1].config.to_dict(), "adapters": False, "adapter_rank": None}
    for step in (2, 4):
        checkpoint.save_checkpoint(tmp_path / "run", step, trained, tokenizer, info, "", resumable_state(step, trained), 3)
    return tmp_path / "run"


def _check(capsys, path) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["check", str(path)])
    return code, capsys.readouterr().out.splitlines()


def _rewrite_tensor(ckpt: Path, name: str, change) -> None:
    """Change one stored tensor and re-sign the manifest: only the mask check can see the damage."""
    tensors = load_file(ckpt / "model.safetensors")
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = file_digests(ckpt, skip=("manifest.json",))
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_an_intact_run_and_each_checkpoint_pass(capsys, run):
    assert _check(capsys, run) == (0, [f"OK: {run}: 2 checkpoints checked"])
    ckpt = run / "checkpoints" / "step_00000004"
    assert _check(capsys, ckpt) == (0, [f"OK: {ckpt}: 1 checkpoint checked"])


def test_a_flipped_bit_fails_in_one_line(capsys, run):
    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, out = _check(capsys, run)
    assert code == 1
    assert out == [f"{weights} fails its SHA-256 check: the file is corrupted",
                   f"FAILED: {run}: 1 finding(s), 2 checkpoints checked"]


def test_a_row_group_keeping_three_of_four_is_found(capsys, run):
    ckpt = run / "checkpoints" / "step_00000004"

    def third_bit(bits):
        bits[0, 0] = 0b0111
        return bits

    _rewrite_tensor(ckpt, f"{LAYER}.row_bits", third_bit)
    code, out = _check(capsys, ckpt)
    assert code == 1
    assert out == [f"{ckpt / 'model.safetensors'}: {LAYER}: 1 row group(s) of M_R do not keep exactly 2 of 4",
                   f"FAILED: {ckpt}: 1 finding(s), 1 checkpoint checked"]


def test_a_column_bit_outside_the_row_mask_is_found(capsys, run, trained):
    ckpt = run / "checkpoints" / "step_00000004"
    layer = trained.get_submodule(LAYER)
    row = slope.masks.unpack_group_bits(layer.row_bits, 4, dim=1)  # (out, in)
    # a column group (rows 0..3 of column j) that keeps >= 2 weights of W_R, and M_C moved onto a pruned one
    j = next(j for j in range(row.shape[1]) if 2 <= int(row[:4, j].sum()) < 4)
    kept = [i for i in range(4) if row[i, j]]
    pruned = next(i for i in range(4) if not row[i, j])

    def move_bit(bits):
        bits[0, j] = (1 << kept[0]) | (1 << pruned)
        return bits

    _rewrite_tensor(ckpt, f"{LAYER}.col_bits", move_bit)
    code, out = _check(capsys, ckpt)
    assert code == 1
    assert out[0] == f"{ckpt / 'model.safetensors'}: {LAYER}: 1 column group(s) of M_C keep positions W_R does not (W_RC ⊄ W_R)"


def test_a_wrong_shape_is_found(capsys, run):
    ckpt = run / "checkpoints" / "step_00000004"
    _rewrite_tensor(ckpt, f"{LAYER}.row_bits", lambda bits: bits[:, :-1].contiguous())
    code, out = _check(capsys, ckpt)
    assert code == 1 and f"{LAYER}: values have shape (64, 32), expected (64, 30)" in out[0] and len(out) == 2


def test_latest_naming_a_folder_outside_the_run_is_a_finding(capsys, run):
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    code, out = _check(capsys, run)
    assert code == 1
    assert out[0] == f"{run / 'checkpoints' / 'latest'} names '../../elsewhere', which is not a complete checkpoint of this run"


def test_exports_are_checked_against_their_own_checksums(capsys, tmp_path, trained, tokenizer):
    out_dir = slope.save_compressed(trained, tmp_path / "export", tokenizer=tokenizer)
    assert _check(capsys, out_dir) == (0, [f"OK: {out_dir}: 1 export checked"])
    weights = out_dir / "slope_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, out = _check(capsys, out_dir)
    assert code == 1 and out[0] == f"{weights} fails its SHA-256 check: the file is corrupted"


def test_a_bad_path_is_a_user_error(capsys, tmp_path):
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"slope check: error: {tmp_path / 'missing'} does not exist"
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tmp_path / "empty")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_an_empty_run_is_damaged(capsys, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, out = _check(capsys, tmp_path / "run")
    assert code == 1 and out[-1].startswith("FAILED:")


def test_check_works_on_a_run_mid_swap(capsys, run):
    """A kill between the renames of a swap: the intact leftover is checked under its own name."""
    ckpts = run / "checkpoints"
    (ckpts / "step_00000004").rename(ckpts / ".old-step_00000004")
    code, out = _check(capsys, run)
    assert code == 0 and out == [f"OK: {run}: 2 checkpoints checked"]
