"""A full disk or a read-only folder while `slope prepare`, `slope export` or `slope train` writes: one line,
exit code 3 (the machine's state, not a mistake in the input nor a bug), and no half-written output left
behind.

The storage failure is raised where the data is written (no test machine can be relied on to fill a disk):
an OSError from the token writer, and safetensors' SafetensorError, whose Rust writer reports the same
failures only in its message (its words on a full tmpfs: "Error while serializing: I/O error: No space
left on device (os error 28)").
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from _cli_output import one_error_line
from _export_fixtures import make_tokenizer, tiny_model, write_training_checkpoint

from slope import cli


@pytest.mark.parametrize(("code", "hint"), [(errno.ENOSPC, "; free some space and run it again"),
                                            (errno.EROFS, "; choose a writable folder and run it again"),
                                            (errno.EACCES, "")])
def test_prepare_on_a_full_or_read_only_disk(text_corpus, tmp_path, capsys, monkeypatch, code, hint):
    from slope.train import prepare

    def full(stem, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(stem) + ".bin")

    monkeypatch.setattr(prepare, "write_tokens", full)
    out = tmp_path / "prepared"
    assert cli.main(["prepare", str(text_corpus() / "train.txt"), "-o", str(out), "--vocab-size", "300"]) == 3
    assert one_error_line(capsys) == f"slope prepare: error: {os.strerror(code)}: {out / 'train'}.bin{hint}"
    assert not out.exists()


def test_export_on_a_full_disk(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    from slope.io import export

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    run = write_training_checkpoint(tmp_path / "run", tiny_model("llama"), make_tokenizer())
    monkeypatch.setattr(export, "save_file", full)
    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--out", str(out)]) == 3
    assert one_error_line(capsys) == "slope export: error: No space left on device; free some space and run it again"
    assert not out.exists()


def test_any_other_failure_is_still_reported_as_a_bug(text_corpus, tmp_path, capsys, monkeypatch):
    from slope.train import prepare

    def broken(*args, **kwargs):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(prepare, "write_tokens", broken)
    assert cli.main(["prepare", str(text_corpus() / "train.txt"), "-o", str(tmp_path / "p"), "--vocab-size",
                     "300"]) == 1
    assert "this is a bug in slope (OSError)" in capsys.readouterr().err


def _safetensors_error(message: str):
    from safetensors import SafetensorError

    return lambda file: SafetensorError(message)


FULL_DISK = {  # what a full disk raises while a checkpoint's file is written
    "OSError": lambda file: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), file),
    # safetensors 0.8's Rust writer, as on a 1.6 MB tmpfs that a checkpoint filled
    "SafetensorError": _safetensors_error("Error while serializing: I/O error: No space left on device (os error 28)"),
    # the wording of earlier safetensors versions (as in test_export_on_a_full_disk)
    "SafetensorError, earlier wording": _safetensors_error(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
}


@pytest.mark.parametrize("raised", list(FULL_DISK))
def test_train_on_a_disk_that_fills_while_a_checkpoint_is_written(text_corpus, tmp_path, capsys, monkeypatch, raised):
    """The second checkpoint fails half-way (its weights, configs and tokenizer written, its trainer state
    not): one line, exit 3, nothing of it left, the first intact; once space is freed, --resume goes on."""
    import safetensors.torch

    from slope.io import checkpoint
    from slope.train.logs import read_metrics

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    save_file = safetensors.torch.save_file

    def full_at_the_second_checkpoint(tensors, filename, *args, **kwargs):
        if Path(filename).parent.name == ".tmp-step_00000004" and Path(filename).name == "trainer_state.safetensors":
            assert (Path(filename).parent / "model.safetensors").is_file()  # part of the checkpoint is written
            raise FULL_DISK[raised](str(filename))
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_at_the_second_checkpoint)
    args = ["train", "--config", "tiny", "--no-progress", "--run-dir", str(run_dir),
            f"--data.train={text_corpus(40_000) / 'train.txt'}", "--data.val=", "--data.val_fraction=0.1",
            "--tokenizer.vocab_size=320", "--train.max_steps=6", "--eval.every=0", "--eval.sets=[]",
            "--checkpoint.every=2"]
    assert cli.main(args) == 3
    out, err = capsys.readouterr()  # stderr: the log of the steps, then the one line; stdout: the config
    assert "Traceback" not in out + err and "error" not in out, out
    assert [line for line in err.splitlines() if "error" in line] == [
        f"slope train: error: cannot write checkpoint {root / 'step_00000004'} (the disk is full); the previous "
        f"checkpoints are intact; the last good checkpoint is {root / 'step_00000002'}"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no .tmp-step_, no .latest.tmp
    assert checkpoint.latest_checkpoint(run_dir) == root / "step_00000002"
    assert cli.main(["check", str(root / "step_00000002")]) == 0

    monkeypatch.undo()  # space freed
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert cli.main(["check", str(root / "step_00000006")]) == 0
