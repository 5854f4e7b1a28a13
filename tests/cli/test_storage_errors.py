"""A full disk or a read-only folder while `slope prepare` or `slope export` writes: one line on stderr, exit
code 3 (the machine's state, not a mistake in the input nor a bug), and no half-written output left behind.

The storage failure is raised where the data is written (no test machine can be relied on to fill a disk):
an OSError from the token writer, and safetensors' SafetensorError, whose Rust writer reports the same
failures only in its message.
"""

from __future__ import annotations

import errno
import os

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
