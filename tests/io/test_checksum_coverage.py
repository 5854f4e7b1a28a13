"""What the checksums cover (docs/reliability.md): every file of a checkpoint's folder is listed in its
manifest, every file of a compressed export in its slope_model.json, which carries its own checksum; nothing
a file says, its format version included, is believed before they pass. Each case goes through the public
entry points: `load_checkpoint`, `load_for_resume`, `slope.load` and `slope check`."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from _export_fixtures import logits, reseal, reseal_export, tiny_model, write_training_checkpoint

import slope
from slope.cli import main
from slope.io import checkpoint
from slope.io.format import FormatError, UnsupportedFormatError

STEP = "checkpoints/step_00000004"
LAYER = "model.layers.1.mlp.up_proj"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", adapters=True)


@pytest.fixture
def run(tmp_path, model, tokenizer):
    run = write_training_checkpoint(tmp_path / "run", model, tokenizer, step=4, run_config="[train]\nseq_len = 32\n")
    assert main(["check", str(run)]) == 0
    return run


@pytest.fixture
def export(tmp_path, model, tokenizer):
    out = slope.save_compressed(model, tmp_path / "export", tokenizer)
    assert main(["check", str(out)]) == 0
    return out


def _refused(path: Path, message: str, capsys, readers=None) -> None:
    """Every reader refuses `path` with a one-line FormatError matching `message`; `slope check` reports it."""
    readers = readers or (checkpoint.load_checkpoint, checkpoint.load_for_resume, lambda p: slope.load(p, device="cpu"))
    for read in readers:
        with pytest.raises(FormatError, match=message) as err:
            read(path)
        assert "\n" not in str(err.value) and not isinstance(err.value, UnsupportedFormatError)
    capsys.readouterr()
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert any(re.search(message, line) for line in out.splitlines()), out


def _drop_entry(ckpt: Path, name: str) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"][name]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _edit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


# ---- a checkpoint: the manifest lists every file of its folder -----------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "tokenizer/tokenizer.json", "trainer_state.safetensors",
                                  "config.toml", "tokenizer/tokenizer_config.json"])
def test_a_file_whose_entry_was_removed_from_the_manifest_is_refused(run, capsys, name):
    """Before: only model.safetensors, slope.json and trainer_state.json had to be listed, so an edit of any
    other file passed once its entry was deleted."""
    ckpt = run / STEP
    _drop_entry(ckpt, name)
    _edit(ckpt / name)
    _refused(run, rf"{ckpt / name} is not listed in {ckpt / 'manifest.json'}", capsys)


@pytest.mark.parametrize("name", ["tokenizer/added_tokens.json", "dcp/__0_0.distcp", "notes.txt", ".hidden"])
def test_a_file_added_to_a_checkpoint_is_refused(run, capsys, name):
    ckpt = run / STEP
    (ckpt / name).parent.mkdir(exist_ok=True)
    (ckpt / name).write_text("{}")
    _refused(run, rf"{ckpt / name} is not listed in", capsys)


def test_a_listed_file_that_is_gone_is_refused(run, capsys):
    (run / STEP / "config.toml").unlink()
    _refused(run, r"config\.toml is missing", capsys)


def test_a_linked_folder_is_refused_not_followed(run, tmp_path, capsys):
    ckpt = run / STEP
    shutil.move(ckpt / "tokenizer", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", ckpt / "tokenizer")
    _refused(run, r"'tokenizer/tokenizer\.json' points outside|tokenizer is not listed", capsys)


def test_an_edited_manifest_format_is_a_format_error_and_resume_falls_back(run, model, tokenizer, capsys, caplog):
    from _export_fixtures import resumable_state

    ckpt = run / STEP
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    _refused(run, r"manifest\.json: manifest format 1, but this slope reads checkpoint format 2\)?$", capsys)
    # an older intact checkpoint is what resume continues from
    checkpoint.save_checkpoint(run, 2, model, tokenizer, json.loads((ckpt / "slope.json").read_text()) | {"step": 2},
                               "", resumable_state(2, model), keep_last=5)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    with caplog.at_level("WARNING"):
        assert checkpoint.load_for_resume(run)[0].name == "step_00000002"
    assert "resuming from step_00000002 (step 2) instead" in caplog.text


@pytest.mark.parametrize("name", ["slope.json", "trainer_state.json"])
def test_a_folder_named_for_another_step_is_refused(run, capsys, name):
    ckpt = run / STEP
    info = json.loads((ckpt / name).read_text())
    (ckpt / name).write_text(json.dumps({**info, "step": 6}))
    reseal(ckpt)  # the files tell one story, the folder's name another
    message = (r"step_00000004: the folder is named for step 4, but slope\.json records step 6" if name == "slope.json"
               else r"trainer_state\.json: the trainer state is at step 6, but slope\.json records step 4")
    readers = (checkpoint.load_checkpoint, lambda p: slope.load(p, device="cpu")) if name == "slope.json" else ()
    _refused(run, message, capsys, readers=(*readers, checkpoint.load_for_resume))


# ---- a compressed export: slope_model.json checksums itself and lists every other file --------------------------


def _set(path: Path, change) -> None:
    meta = json.loads((path / "slope_model.json").read_text())
    change(meta)
    (path / "slope_model.json").write_text(json.dumps(meta, indent=1))


EXPORT_EDITS = {
    # before, none of these was caught: slope_model.json was not checksummed, and a file it did not list was
    # not looked at; `slope check` said OK and the model's outputs changed
    "adapter_scale": lambda p: _set(p, lambda m: m["layers"][LAYER].update(adapter_scale=100)),
    "rope_theta": lambda p: _set(p, lambda m: m["model_config"]["rope_parameters"].update(rope_theta=1.0)),
    "dtype": lambda p: _set(p, lambda m: m.update(dtype="float16")),
    "an entry removed": lambda p: _set(p, lambda m: m["files"].pop("README.md")),
    "whitespace": lambda p: (p / "slope_model.json").write_text((p / "slope_model.json").read_text() + " "),
    "README.md": lambda p: _edit(p / "README.md"),
    "config.json": lambda p: _edit(p / "config.json"),
    "tokenizer.json": lambda p: _edit(p / "tokenizer.json"),
    "tokenizer/tokenizer_config.json": lambda p: _edit(p / "tokenizer" / "tokenizer_config.json"),
    "an added file": lambda p: (p / "chat_template.jinja").write_text("{{ messages }}"),
}
EXPORT_MESSAGES = {"an added file": r"chat_template\.jinja is not listed in .*slope_model\.json"}


@pytest.mark.parametrize("edit", list(EXPORT_EDITS))
def test_any_edit_of_any_file_of_an_export_is_refused(export, capsys, edit):
    EXPORT_EDITS[edit](export)
    in_meta = edit in ("adapter_scale", "rope_theta", "dtype", "an entry removed", "whitespace")
    message = EXPORT_MESSAGES.get(edit, r"slope_model\.json fails its own SHA-256 check \(metadata_sha256\)" if in_meta
                                  else "SHA-256|bytes, expected")
    _refused(export, message, capsys, readers=(lambda p: slope.load(p, device="cpu"),))


def test_the_checksums_are_not_signatures(export, model, ids):
    """What they do not catch (docs/reliability.md): an edit that writes the checksums again."""
    _set(export, lambda m: m["layers"][LAYER].update(adapter_scale=100))
    reseal_export(export)
    edited = slope.load(export, device="cpu", backend="reference")
    assert not torch.allclose(logits(edited, ids), logits(model, ids))
