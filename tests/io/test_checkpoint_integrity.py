"""Trusting a checkpoint (slope.io.checkpoint): no pickle on any load path, paths confined to their run or
export, a manifest checked on every load, and a writer that a kill or a full disk cannot leave without an
intact checkpoint."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _export_fixtures import format1_run, reseal, reseal_export, resumable_state, tiny_model

import slope
from slope.io import checkpoint
from slope.io.format import FormatError, UnsupportedFormatError
from slope.io.load import load, read_metadata, verify_files
from slope.train.resume import rng_state, set_rng_state


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", adapters=True)


def _method_info(model) -> dict:
    layers = slope.slope_layers(model)
    return {"method": "slope", "slope_config": layers[0][1].config.to_dict(),
            "adapters": any(layer.rank for _, layer in layers), "adapter_rank": None}


def _save(run_dir, step, model, tokenizer, state=None, keep_last=3):
    return checkpoint.save_checkpoint(run_dir, step, model, tokenizer, _method_info(model),
                                      "[train]\nseq_len = 32\n", state or resumable_state(step, model), keep_last)


def _flip_bit(file: Path, offset: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    at = len(data) - 1 if offset is None else offset  # the last byte: tensor data, not the header
    data[at] ^= 1
    file.write_bytes(bytes(data))


# ---- the trainer state: JSON + safetensors, exact round trip --------------------------------------------


def test_trainer_state_round_trips_without_pickle(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    sum(p.sum() for p in params).backward()
    opt.step()
    random.seed(3)
    np.random.seed(4)
    state = {"step": 7, "tokens_seen": 1024, "train_seconds": 1.5, "optimizer": opt.state_dict(),
             "sampler": {"generator": torch.Generator().manual_seed(5).get_state(), "batches": 9},
             "rng": rng_state(), "scaler": {}}
    checkpoint.write_trainer_state(tmp_path, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer_state.json", "trainer_state.safetensors"]
    back = checkpoint.load_trainer_state(tmp_path)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # tuple betas, int params
    assert back["optimizer"]["state"].keys() == {0, 1}
    for key, moments in state["optimizer"]["state"].items():
        assert all(torch.equal(back["optimizer"]["state"][key][k], v) for k, v in moments.items())
    fresh = torch.optim.AdamW(params, lr=1e-3)
    fresh.load_state_dict(back["optimizer"])  # int keys map back onto the parameters
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


# ---- no pickle, no escaping paths -------------------------------------------------------------------------


def test_a_pickle_payload_in_trainer_state_never_runs(tmp_path, model, tokenizer):
    """No reader opens a trainer_state.pt: not in a run as slope 0.1 wrote it (refused for its format before
    any other file is read), not next to a current checkpoint's trainer state."""
    run = tmp_path / "run"
    _save(run, 2, model, tokenizer)
    marker = tmp_path / "pwned"
    old = format1_run(tmp_path / "old", run, marker)
    for read in (checkpoint.load_for_resume, checkpoint.load_checkpoint, lambda p: load(p, device="cpu")):
        with pytest.raises(UnsupportedFormatError, match="has checkpoint format 1") as err:
            read(old)
        assert "\n" not in str(err.value)
    ckpt = checkpoint.latest_checkpoint(run)
    shutil.copy(old / "checkpoints" / ckpt.name / "trainer_state.pt", ckpt)  # a stray pickle in a format-2 checkpoint
    with pytest.raises(FormatError, match="no intact checkpoint"):  # not in the manifest: refused unread
        checkpoint.load_for_resume(run)
    reseal(ckpt)  # listed now: still never opened
    assert checkpoint.load_for_resume(run)[1]["step"] == 2
    assert not marker.exists()


@pytest.mark.parametrize("pointer", ["../../elsewhere/checkpoints/step_00000009", "ABSOLUTE", "step_00000009/../.."])
def test_latest_outside_the_run_is_not_followed(tmp_path, model, tokenizer, pointer):
    run = tmp_path / "run"
    _save(run, 2, model, tokenizer)
    elsewhere = tmp_path / "elsewhere" / "checkpoints" / "step_00000009"
    shutil.copytree(run / "checkpoints" / "step_00000002", elsewhere)
    pointer = str(elsewhere) if pointer == "ABSOLUTE" else pointer
    (run / "checkpoints" / "latest").write_text(pointer + "\n")
    assert checkpoint.latest_checkpoint(run) == run / "checkpoints" / "step_00000002"
    assert checkpoint.resolve_checkpoint(run) == run / "checkpoints" / "step_00000002"


def test_a_step_directory_linking_outside_the_run_is_not_followed(tmp_path, model, tokenizer):
    run = tmp_path / "run"
    _save(run, 2, model, tokenizer)
    outside = tmp_path / "outside"
    shutil.copytree(run / "checkpoints" / "step_00000002", outside)
    (run / "checkpoints" / "step_00000009").symlink_to(outside)
    (run / "checkpoints" / "latest").write_text("step_00000009\n")
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_00000002"]
    assert checkpoint.latest_checkpoint(run).name == "step_00000002"


@pytest.mark.parametrize("entry", ["/etc/hostname", "../secret.txt", "tokenizer/../../secret.txt"])
def test_export_files_outside_the_export_are_never_read(tmp_path, model, tokenizer, entry):
    out = slope.save_compressed(model, tmp_path / "export", tokenizer=tokenizer)
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    meta = json.loads((out / "slope_model.json").read_text())
    meta["files"][entry] = {"bytes": 1, "sha256": "0" * 64}
    (out / "slope_model.json").write_text(json.dumps(meta))
    reseal_export(out, relist=False)  # past the metadata's own checksum, to the list it holds
    with pytest.raises(FormatError, match="points outside") as err:
        verify_files(out, read_metadata(out))
    assert "bytes" not in str(err.value) and "\n" not in str(err.value)  # nothing about the file leaks
    with pytest.raises(FormatError, match="points outside"):
        load(out, device="cpu")


# ---- the manifest ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("part", ["model.safetensors", "trainer_state.safetensors", "trainer_state.json",
                                  "tokenizer/tokenizer.json"])
def test_one_flipped_bit_is_reported_in_one_line(tmp_path, model, tokenizer, part):
    run = tmp_path / "run"
    ckpt = _save(run, 2, model, tokenizer)
    assert checkpoint.verify_checkpoint(ckpt)["step"] == 2
    _flip_bit(ckpt / part)
    message = rf"{part.replace('.', '[.]')} fails its SHA-256 check"
    with pytest.raises(FormatError, match=message) as err:
        checkpoint.verify_checkpoint(ckpt)
    assert "\n" not in str(err.value)
    with pytest.raises(FormatError, match=message):
        checkpoint.load_checkpoint(run)
    with pytest.raises(FormatError, match=message):
        load(run, device="cpu")


def test_a_format2_checkpoint_without_its_manifest_is_refused(tmp_path, model, tokenizer):
    ckpt = _save(tmp_path / "run", 2, model, tokenizer)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(FormatError, match="manifest"):
        checkpoint.load_checkpoint(ckpt)


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, model, tokenizer, caplog):
    run = tmp_path / "run"
    _save(run, 2, model, tokenizer)
    newest = _save(run, 4, model, tokenizer)
    _flip_bit(newest / "model.safetensors")
    with caplog.at_level("WARNING"):
        ckpt, state = checkpoint.load_for_resume(run)
    assert ckpt.name == "step_00000002" and state["step"] == 2
    assert "step_00000004 is damaged" in caplog.text and "resuming from step_00000002" in caplog.text
    _flip_bit(ckpt / "trainer_state.safetensors")
    with pytest.raises(FormatError, match="no intact checkpoint to resume from"):
        checkpoint.load_for_resume(run)


# ---- crash safety: a kill at every point of the writer, a full disk at every write -------------------------


class Killed(BaseException):
    """Not an Exception: like SIGKILL, nothing in the writer gets to clean up after it."""


def _kill_at(monkeypatch, k: int) -> list[str]:
    """Make the k-th file-system step of the writer (rename, replace, rmtree) never happen: the process dies."""
    done: list[str] = []

    def step(name, real):
        def wrapper(*args, **kwargs):
            if len(done) == k:
                raise Killed(name)
            done.append(name)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(checkpoint.os, "rename", step("rename", os.rename))
    monkeypatch.setattr(checkpoint.os, "replace", step("replace", os.replace))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", step("rmtree", shutil.rmtree))
    return done


# The writer's file-system steps: a new step is rmtree .tmp-, rename .tmp- -> step, replace latest (3);
# the same step again adds rmtree .old-, rename step -> .old- and rmtree .old- (6). k = all: no kill.
KILLS = [(False, k) for k in range(4)] + [(True, k) for k in range(7)]


@pytest.mark.parametrize(("rewrite", "k"), KILLS, ids=[f"{'same' if r else 'new'} step, killed at {k}" for r, k in KILLS])
def test_a_kill_at_any_point_leaves_an_intact_checkpoint(tmp_path, model, tokenizer, monkeypatch, rewrite, k):
    run = tmp_path / "run"
    _save(run, 2, model, tokenizer)
    _save(run, 4, model, tokenizer, state={"step": 4, "copy": "first"})
    done = _kill_at(monkeypatch, k)
    with contextlib.suppress(Killed):
        _save(run, 4 if rewrite else 6, model, tokenizer, state={"step": 4 if rewrite else 6, "copy": "second"})
    monkeypatch.undo()
    assert len(done) == k  # killed exactly there (or, at the last k, completed)
    ckpt = checkpoint.resolve_checkpoint(run)
    assert checkpoint.verify_checkpoint(ckpt)["step"] in (4, 6)
    assert checkpoint.load_trainer_state(ckpt)["step"] == checkpoint.read_info(ckpt)["step"]
    checkpoint.load_checkpoint(run)
    assert {p.name.removeprefix(".tmp-").removeprefix(".old-") for p in checkpoint.list_checkpoints(run)} >= {
        "step_00000002", "step_00000004"}
    # the next checkpoint finishes what the kill interrupted: no leftovers, every step in place
    _save(run, 8, model, tokenizer)
    root = run / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert all(p.parent == root and p.name.startswith("step_") for p in checkpoint.list_checkpoints(run))


def test_a_kill_in_the_middle_of_a_swap_is_recovered_by_the_reader(tmp_path, model, tokenizer, monkeypatch):
    """Killed between moving the old copy aside and moving the new one in: both leftovers are intact."""
    run = tmp_path / "run"
    _save(run, 4, model, tokenizer, state={"step": 4, "copy": "first"})
    _kill_at(monkeypatch, 3)  # rmtree .tmp-, rmtree .old-, rename step -> .old-, then (killed) .tmp- -> step
    with contextlib.suppress(Killed):
        _save(run, 4, model, tokenizer, state={"step": 4, "copy": "second"})
    monkeypatch.undo()
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".old-step_00000004", ".tmp-step_00000004", "latest"]
    ckpt = checkpoint.resolve_checkpoint(run)
    assert ckpt.name == ".tmp-step_00000004"  # the complete new copy wins over the old one
    assert checkpoint.load_trainer_state(ckpt)["copy"] == "second"
    checkpoint.load_checkpoint(run)


WRITES = {  # each place the writer puts bytes on disk or moves a directory
    "model weights": "safetensors.torch.save_model",
    "trainer tensors": "safetensors.torch.save_file",
    "a text file": "pathlib.Path.write_text",
    "the manifest or latest": "slope.io.checkpoint._write_durably",
    "the rename": "os.rename",
    "latest's replace": "os.replace",
}


@pytest.mark.parametrize("target", list(WRITES))
def test_a_full_disk_gives_one_line_and_leaves_nothing_behind(tmp_path, model, tokenizer, monkeypatch, target):
    run = tmp_path / "run"
    _save(run, 2, model, tokenizer)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WRITES[target], full)
    with pytest.raises(checkpoint.CheckpointWriteError, match="cannot write checkpoint .*step_00000004 "
                       r"\(the disk is full\); the previous checkpoints are intact") as err:
        _save(run, 4, model, tokenizer)
    monkeypatch.undo()
    assert "\n" not in str(err.value)
    root = run / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert checkpoint.resolve_checkpoint(run).name in ("step_00000002", "step_00000004")
    checkpoint.load_checkpoint(run)
