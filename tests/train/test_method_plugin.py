"""A method is one class plus a registry line: the toy method of docs/methods.md ("Adding a method"), run as
written there, trains through `slope train` with its own [method] key; bad values and keys of other
methods are one line and exit 2. The docs' code block is what runs, so the docs cannot drift."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slope.cli import main
from slope.train.methods import METHODS

DOC = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


@pytest.fixture
def toy_method(monkeypatch):
    section = DOC.read_text().split("## Adding a method", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    # a copy of the registry for this test, so the docs' registry line does not outlive it
    monkeypatch.setattr("slope.train.methods.METHODS", dict(METHODS))
    import slope.train.methods as registry

    exec(compile(code, str(DOC), "exec"), {})
    assert "noisy-dense" in registry.METHODS and "noisy-dense" not in METHODS
    return registry.METHODS["noisy-dense"]


def test_toy_method_trains_with_its_own_option(toy_method, tmp_path, text_corpus):
    run = tmp_path / "run"
    code = main(["train", "--config", "tiny", "--run-dir", str(run), "--no-progress", "--method", "noisy-dense",
                 "--method.noise_std=0.02", f"--data.train={text_corpus() / 'train.txt'}", "--data.val=",
                 "--train.max_steps=2", "--eval.sets=[]", "--run.logger=none"])
    assert code == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "noisy-dense" and summary["method_options"] == {"noise_std": 0.02}
    assert 'name = "noisy-dense"' in (run / "config.toml").read_text() and "noise_std = 0.02" in (run / "config.toml").read_text()


def test_toy_method_checks_and_foreign_keys_are_one_line(toy_method, tmp_path, capsys):
    assert main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "a"), "--method", "noisy-dense",
                 "--method.noise_std=-1"]) == 2
    assert capsys.readouterr().err.strip().endswith("config key 'method.noise_std' must be >= 0, got -1.0")
    assert main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "b"), "--method", "slope",
                 "--method.srste_decay=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "config key 'method.srste_decay' does not apply to method 'slope'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
