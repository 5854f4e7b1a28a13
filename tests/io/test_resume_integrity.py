"""`slope train --resume` on checkpoints that cannot be trusted: a damaged newest checkpoint (fall back to the
previous good one, same result as never failing), a run of slope 0.1 (format 1, whose trainer_state.pt may
hold a pickle payload: refused in one line, never unpickled), `latest` naming a folder outside the run, a
full disk."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slope import cli
from slope.io import checkpoint
from slope.train.logs import read_metrics


@pytest.fixture(scope="module")
def corpus_file(text_corpus):
    return text_corpus(40_000) / "train.txt"  # tests/conftest.py


def _train_args(corpus_file, run_dir):
    return ["train", "--config", "tiny", "--no-progress", "--run-dir", str(run_dir),
            f"--data.train={corpus_file}", "--data.val=", "--data.val_fraction=0.1", "--tokenizer.vocab_size=320",
            "--eval.every=0", "--eval.sets=[]", "--checkpoint.every=2", "--checkpoint.keep_last=4"]


@pytest.fixture(scope="module")
def full_run(corpus_file, tmp_path_factory):
    """8 steps, checkpoints at 2, 4, 6 and 8."""
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    assert cli.main(_train_args(corpus_file, run_dir)) == 0
    return run_dir


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def _flip_last_bit(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))


def test_resume_skips_a_damaged_checkpoint_and_still_reproduces_the_run(full_run, tmp_path, caplog):
    resumed = tmp_path / "resumed"
    shutil.copytree(full_run, resumed)
    ckpts = resumed / "checkpoints"
    shutil.rmtree(ckpts / "step_00000008")
    (ckpts / "latest").write_text("step_00000006\n")
    _flip_last_bit(ckpts / "step_00000006" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        assert cli.main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    assert "step_00000006 is damaged" in caplog.text and "fails its SHA-256 check" in caplog.text
    assert "resuming from step_00000004 (step 4) instead" in caplog.text
    assert _losses(resumed) == _losses(full_run)
    final, expected = (load_file(checkpoint.latest_checkpoint(run) / "model.safetensors") for run in (resumed, full_run))
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    checkpoint.verify_checkpoint(ckpts / "step_00000006")  # written again, intact this time


def test_resume_follows_no_latest_outside_the_run(full_run, tmp_path, caplog):
    resumed = tmp_path / "resumed"
    shutil.copytree(full_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    decoy = tmp_path / "decoy" / "checkpoints" / "step_00000008"
    shutil.copytree(full_run / "checkpoints" / "step_00000008", decoy)
    (resumed / "checkpoints" / "latest").write_text("../../decoy/checkpoints/step_00000008\n")
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    assert "not a checkpoint of this run: ignored" in caplog.text
    assert "resumed from" in caplog.text and "step_00000006 (step 6)" in caplog.text


def test_a_format1_run_is_refused_and_never_unpickled(full_run, tmp_path, capsys):
    """A run as slope 0.1 wrote it (format 1, the trainer state pickled): refused in one line, nothing opened."""
    from _export_fixtures import format1_run

    marker = tmp_path / "pwned"
    run = format1_run(tmp_path / "old-run", full_run, marker)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    ckpt = run / "checkpoints" / "step_00000008"
    assert err == [f"slope train: error: {ckpt / 'slope.json'} has checkpoint format 1, which this version of slope "
                   "does not read (it reads format 2 only; format 1 was written by slope 0.1)"]
    assert not marker.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step_00000002", "step_00000004", "step_00000006", "step_00000008"]  # nothing written


def test_a_full_disk_while_training_stops_in_one_line(corpus_file, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    assert cli.main(_train_args(corpus_file, run_dir)) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert lines == [f"slope train: error: cannot write checkpoint {run_dir / 'checkpoints' / 'step_00000002'} "
                     "(the disk is full); the previous checkpoints are intact; no checkpoint had been written yet"]
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def _set_json(file: Path, key: str, value) -> None:
    data = json.loads(file.read_text())
    data[key] = value
    file.write_text(json.dumps(data))


def _row_mask_keeps_4_of_4(ckpt: Path) -> None:
    from safetensors.torch import save_file

    tensors = load_file(ckpt / "model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith(".row_bits"))
    tensors[key][0, 0] = 0b1111
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


RESUME_DAMAGE = {  # what `slope check` finds, resume now refuses too, in the same words
    "row mask keeps 4 of 4": (_row_mask_keeps_4_of_4, "row group(s) of M_R do not keep exactly 2 of 4"),
    "trainer state a list": (lambda c: (c / "trainer_state.json").write_text("[]"),
                             "malformed trainer state (expected a JSON object, got list)"),
    "trainer state without its sampler": (lambda c: _set_json(c / "trainer_state.json", "sampler", None),
                                          "malformed trainer state: sampler must be an object"),
    "trainer state of another step": (lambda c: _set_json(c / "trainer_state.json", "step", 6),
                                      "the trainer state is at step 6, but slope.json records step 8"),
}


@pytest.mark.parametrize("damage", list(RESUME_DAMAGE))
def test_resume_refuses_what_check_refuses_in_one_line(full_run, tmp_path, capsys, damage):
    """The damage passes the checksums (written again); before, it reached the trainer (a KeyError,
    AttributeError or TypeError traceback) or, for the masks, trained on."""
    from _export_fixtures import reseal

    change, finding = RESUME_DAMAGE[damage]
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    for step in (2, 4, 6):
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    ckpt = run / "checkpoints" / "step_00000008"
    change(ckpt)
    reseal(ckpt)
    capsys.readouterr()
    assert cli.main(["check", str(run)]) == 1
    assert finding in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(run), "--no-progress"]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "no intact checkpoint to resume from" in err[0] and finding in err[0], err
    assert "Traceback" not in stderr
