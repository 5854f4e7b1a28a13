"""run.threads: torch's CPU threads per process, explicit or auto (the cores left free, shared among the
run's processes on this machine), applied by the trainer and recorded in summary.json."""

from __future__ import annotations

import json

import pytest
import torch

from slope.cli import main
from slope.train import hardware


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_auto_takes_the_free_cores_shared_among_local_processes(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (2.2, 0.0, 0.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert hardware.pick_threads(0) == 6  # 8 cores, about 2 busy
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hardware.pick_threads(0) == 3  # shared by the run's two processes here
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert hardware.pick_threads(0) == 1  # every core busy: one thread, never zero
    assert hardware.pick_threads(5) == 5  # explicit wins


def test_the_trainer_applies_and_records_it(tmp_path, text_corpus, restore_threads, capsys):
    run = tmp_path / "run"
    torch.set_num_threads(2)
    assert main(["train", "--config", "tiny", "--run-dir", str(run), "--no-progress", "--run.threads=1",
                 f"--data.train={text_corpus() / 'train.txt'}", "--data.val=", "--train.max_steps=1",
                 "--eval.sets=[]", "--run.logger=none"]) == 0
    assert torch.get_num_threads() == 1
    assert json.loads((run / "summary.json").read_text())["threads"] == 1
    assert main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "bad"), "--run.threads=-1"]) == 2
    assert "run.threads" in capsys.readouterr().err
