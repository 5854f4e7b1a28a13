"""SIGKILL a tiny `slope train` run at chosen moments, `--resume` it to the end, and demand the uninterrupted result.

A days-long run dies without warning (OOM killer, preemption, power): no handler runs. Each trial kills
the process with SIGKILL when the run directory shows a given moment (polled on the filesystem, so the
moment is the same on a slow or a fast machine), resumes until the run finishes, and checks that
- the final checkpoint's weights equal, tensor by tensor and bitwise, those of one uninterrupted run
  (dropout is on, so a resume that lost the RNG state would differ);
- metrics.jsonl holds no duplicated (kind, set, step) record and its steps strictly increase per stream;
- summary.json and metrics.jsonl hold no NaN or infinity.
benchmarks/kill_resume.py runs 30 such trials at random moments; these few guard CI.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slope.train import corpus

MAX_STEPS = 12  # adapters join before step 10 (tiny's adapter_start 0.75), so resumes cross the switch
RUN_TIMEOUT = 180  # seconds for one process: generous for a loaded CI machine, yet the test cannot hang
FINAL = f"step_{MAX_STEPS:08d}"


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("corpus") / "train.txt"
    works = dict(corpus.embedded_documents("shakespeare"))
    file.write_text(works["shakespeare:macbeth_gut.txt"][:60_000])  # a few seconds of tokenizer training
    return file


def train_command(run_dir: Path, train_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "slope", "train", "--config", "tiny", "--run-dir", str(run_dir), "--no-progress",
        f"--data.train={train_file}", "--data.val=", "--data.val_fraction=0.1", "--tokenizer.vocab_size=320",
        f"--train.max_steps={MAX_STEPS}", "--checkpoint.every=2", "--eval.every=0", "--eval.sets=[]",
        "--model.dropout=0.1",
    ]


def resume_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "slope", "train", "--resume", str(run_dir), "--no-progress"]


def log_of(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".log")  # outside the run directory, which must not exist yet


def run_to_end(command: list[str], run_dir: Path) -> None:
    with open(log_of(run_dir), "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"{command[3:]} exited {result.returncode}:\n{log_of(run_dir).read_text()[-3000:]}"


def kill_when(command: list[str], run_dir: Path, moment: Callable[[Path], str | None]) -> str:
    """Start `command`, SIGKILL it as soon as `moment(run_dir)` names what it sees; returns that name."""
    with open(log_of(run_dir), "a") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            seen = moment(run_dir)
            if seen:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return seen
            time.sleep(0.001)  # the write of a checkpoint lasts milliseconds
        raise AssertionError(f"the moment never came (exit {proc.poll()}):\n{log_of(run_dir).read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def checkpoint_names(run_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(run_dir / "checkpoints"))
    except OSError:  # not created yet
        return []


def writing(min_step: int) -> Callable[[Path], str | None]:
    """The moment a checkpoint of step >= min_step is being written (its .tmp- directory exists)."""
    def moment(run_dir):
        return next((n for n in checkpoint_names(run_dir)
                     if n.startswith(".tmp-step_") and int(n[-8:]) >= min_step), None)
    return moment


def final_eval_logged(run_dir: Path) -> str | None:
    """The moment metrics.jsonl holds the final evaluation (summary.json comes after the curves)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    final = [line for line in lines if '"kind": "eval"' in line and f'"step": {MAX_STEPS},' in line]
    return "final eval logged" if final else None


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / FINAL / "model.safetensors")


def strict_json(text: str):
    """json.loads that fails on NaN and infinities (Python's json writes and reads them by default)."""
    def refuse(constant):
        raise AssertionError(f"non-finite value {constant} in the run's JSON")
    return json.loads(text, parse_constant=refuse)


def check_run(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = final_weights(run_dir)
    assert weights.keys() == reference.keys()
    differing = [k for k in reference if not torch.equal(weights[k], reference[k])]
    assert not differing, f"final weights differ bitwise from the uninterrupted run: {differing[:5]}"

    records = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last: dict[tuple, int] = {}
    for r in records:
        stream = (r.get("kind"), r.get("set"))
        assert r["step"] > last.get(stream, -1), f"metrics.jsonl: {stream} step {r['step']} repeated or out of order"
        last[stream] = r["step"]
    assert last[("train", None)] == MAX_STEPS

    summary = strict_json((run_dir / "summary.json").read_text())
    assert summary["steps"] == MAX_STEPS
    assert all(math.isfinite(v) for v in _numbers(summary)), "summary.json holds a NaN"


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, float):
        yield value


@pytest.fixture(scope="module")
def reference(train_file, tmp_path_factory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(train_command(run_dir, train_file), run_dir)
    return final_weights(run_dir)


def test_kill_during_checkpoint_writes_and_during_a_resume(train_file, reference, tmp_path):
    run_dir = tmp_path / "run"
    seen = kill_when(train_command(run_dir, train_file), run_dir, writing(4))
    assert seen in checkpoint_names(run_dir), "the killed process had already finished that checkpoint"
    # the resumed process dies too, writing a checkpoint after the adapters joined
    seen = kill_when(resume_command(run_dir), run_dir, writing(10))
    assert seen in checkpoint_names(run_dir)
    run_to_end(resume_command(run_dir), run_dir)
    check_run(run_dir, reference)


def test_kill_in_the_final_evaluation(train_file, reference, tmp_path):
    run_dir = tmp_path / "run"
    # the final checkpoint and evaluation are written, summary.json not yet (the curves are being drawn):
    # the resume has no step left to train, and must neither log a NaN loss nor the final eval twice
    kill_when(train_command(run_dir, train_file), run_dir, final_eval_logged)
    assert not (run_dir / "summary.json").exists(), "the run finished before it was killed"
    run_to_end(resume_command(run_dir), run_dir)
    check_run(run_dir, reference)
