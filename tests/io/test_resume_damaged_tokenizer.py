"""`slope train --resume` of a run whose RUN/data/tokenizer/ is damaged: one line on stderr, exit 2, no
traceback (docs/reliability.md), whatever the damage: tokenizer.json truncated, emptied, deleted, or
the whole folder missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slope import cli


@pytest.fixture(scope="module")
def finished_run(text_corpus, tmp_path_factory):
    text = text_corpus(20_000) / "train.txt"  # tests/conftest.py
    run_dir = tmp_path_factory.mktemp("tokrun") / "run"
    args = ["train", "--config", "tiny", "--no-progress", "--run-dir", str(run_dir), f"--data.train={text}",
            "--data.val=", "--data.val_fraction=0.1", "--tokenizer.vocab_size=300", "--eval.every=0",
            "--eval.sets=[]", "--checkpoint.every=2", "--train.max_steps=2"]
    assert cli.main(args) == 0
    return run_dir


def _truncate(folder: Path) -> None:
    file = folder / "tokenizer.json"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _empty(folder: Path) -> None:
    (folder / "tokenizer.json").write_bytes(b"")


def _delete_file(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def _delete_folder(folder: Path) -> None:
    shutil.rmtree(folder)


def _garbage(folder: Path) -> None:
    (folder / "tokenizer.json").write_bytes(b"\xff\xfe not json \x00")


@pytest.mark.parametrize("damage", [_truncate, _empty, _delete_file, _delete_folder, _garbage],
                         ids=lambda f: f.__name__.strip("_"))
def test_resume_with_a_damaged_run_tokenizer_is_one_line_exit_2(finished_run, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    damage(run_dir / "data" / "tokenizer")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("slope train: error: ") and "tokenizer" in lines[0], err
