"""`slope eval --tasks slope_text_perplexity --tasks-data FILE`: a wrong data file is one line naming the
file, the line and what is expected, and exit 2, through the real command line (no traceback)."""

from __future__ import annotations

import pytest
from _export_fixtures import make_tokenizer, tiny_model

from slope.io.export import save_compressed
from slope.train.lmeval import LOCAL_TASK

pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (pip install 'slope[eval]')")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save_compressed(tiny_model("llama"), tmp_path_factory.mktemp("task_data") / "e", make_tokenizer())


@pytest.mark.parametrize(("content", "message"), [
    (b'{"text": "fine"}\n{"body": "a JSONL whose field is not text"}\n', 'line 2 has no string "text" field'),
    (b'{"text": "fine"}\nnot json at all\n', "line 2 is not JSON"),
    (b"PAR1\x15\x04\x15\x80\x01\x00\xff\xfe binary", "line 1 is not UTF-8 text (is it a Parquet"),
    (b'["text", "a list, not an object"]\n', 'line 1 has no string "text" field'),
    (b"\n\n", "no documents"),
])
def test_bad_task_data_is_one_line_and_exit_2(exported, tmp_path, capsys, content, message):
    from slope.cli import main

    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    assert main(["eval", str(exported), "--tasks", LOCAL_TASK, "--tasks-data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(data) in err
    assert "Traceback" not in err and "bug in slope" not in err and len(err.strip().splitlines()) == 1


def test_no_git_noise_outside_a_repository(exported, tmp_path):
    # lm-eval looks up the git commit of the current directory; outside a repository git's
    # "fatal: not a git repository" reached the terminal on every evaluation
    import shutil
    import subprocess
    import sys

    if shutil.which("git") is None:
        pytest.skip("git is not installed: nothing would print")
    done = subprocess.run([sys.executable, "-m", "slope", "eval", str(exported), "--tasks", LOCAL_TASK, "--limit", "1",
                           "--device", "cpu", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "not a git repository" not in done.stderr
