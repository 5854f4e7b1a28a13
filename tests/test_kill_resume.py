"""SIGKILL or SIGTERM a tiny `slope train` run at chosen moments, resume it, demand the uninterrupted result.

A days-long run dies without warning (OOM killer, preemption, power): no handler runs. Each trial runs
`slope train` through a launcher that stops the process (SIGSTOP, after writing a marker file) at an
exact moment: half-way through writing a checkpoint (its .tmp- directory without a manifest); with a
checkpoint complete but not yet renamed into place; after the final evaluation, before summary.json.
The test SIGKILLs the stopped process, so the kill lands at that moment on a slow or a fast machine
alike (no polling race). A preempted run is warned first: one resume gets SIGTERM, sent by the launcher
itself at exact moments (while a checkpoint is written, then twice again as the stopped run exits), and
must stop with exit 143 and a checkpoint of the step it finished. Each trial resumes until the run
finishes, and checks that
- the final checkpoint's weights equal, tensor by tensor and bitwise, those of one uninterrupted run
  (dropout is on, so a resume that lost the RNG state would differ);
- metrics.jsonl holds no duplicated (kind, set, step) record and its steps strictly increase per stream;
- summary.json and metrics.jsonl hold no NaN or infinity.
benchmarks/kill_resume.py runs 45 such trials (30 SIGKILL, 15 SIGTERM) at random moments; these few
guard CI.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MAX_STEPS = 12  # adapters join before step 10 (tiny's adapter_start 0.75), so resumes cross the switch
RUN_TIMEOUT = 180  # seconds for one process: generous for a loaded CI machine, yet the test cannot hang
FINAL = f"step_{MAX_STEPS:08d}"


@pytest.fixture(scope="module")
def train_file(text_corpus) -> Path:
    return text_corpus() / "train.txt"  # tests/conftest.py: a few seconds of tokenizer training


def train_command(run_dir: Path, train_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "slope", "train", "--config", "tiny", "--run-dir", str(run_dir), "--no-progress",
        f"--data.train={train_file}", "--data.val=", "--data.val_fraction=0.1", "--tokenizer.vocab_size=320",
        f"--train.max_steps={MAX_STEPS}", "--checkpoint.every=2", "--eval.every=0", "--eval.sets=[]",
        "--model.dropout=0.1",
    ]


def resume_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "slope", "train", "--resume", str(run_dir), "--no-progress"]


# Runs `slope train` (its arguments after the launcher's path) and, at each moment SLOPE_TEST_PAUSE names
# (a comma-separated list, each moment once), appends the moment's name to SLOPE_TEST_MARKER and stops
# itself (SIGSTOP: the test SIGKILLs it there), or, for a moment written `term@...`, sends itself SIGTERM
# (as a scheduler would) and goes on:
#   writing:N   a checkpoint of step >= N is half written: weights, config and tokenizer are in its
#               .tmp- directory, its trainer state and manifest not yet (a kill leaves it incomplete)
#   renaming:N  a checkpoint of step >= N is complete in its .tmp- directory, not yet renamed into place
#   plotting    the final evaluation is logged, the curves and summary.json are not yet written
#   stopped     a stop signal ended the training loop: its checkpoint is written, the process exits
#   exiting     the interpreter shuts down (after atexit, once Python's signal handlers are reset)
LAUNCHER = """
import os, signal, sys
from pathlib import Path

moments = os.environ["SLOPE_TEST_PAUSE"].split(",")
marker = Path(os.environ["SLOPE_TEST_MARKER"])

def step_of(path):
    name = Path(path).name
    return int(name[-8:]) if name.startswith(".tmp-step_") else -1

def at(where, what, path=""):
    for moment in moments:
        kind, _, step = moment.removeprefix("term@").partition(":")
        if kind == where and (not step or step_of(path) >= int(step)):
            moments.remove(moment)
            reached = marker.read_text() if marker.exists() else ""
            marker.with_suffix(".tmp").write_text(reached + what + "\\n")
            os.replace(marker.with_suffix(".tmp"), marker)  # the test sees the whole line or no marker
            os.kill(os.getpid(), signal.SIGTERM if moment.startswith("term@") else signal.SIGSTOP)
            return

from slope.io import checkpoint
write_state = checkpoint.write_trainer_state  # called by the checkpoint writer between its files
def writing(folder, state):
    at("writing", Path(folder).name, folder)
    return write_state(folder, state)
checkpoint.write_trainer_state = writing

rename = os.rename
def renaming(src, dst, *args, **kwargs):
    at("renaming", Path(src).name, src)
    return rename(src, dst, *args, **kwargs)
os.rename = renaming

from slope.train import plots
plot_curves = plots.plot_curves
def plotting(*args, **kwargs):
    at("plotting", "plotting")
    return plot_curves(*args, **kwargs)
plots.plot_curves = plotting

from slope.train import stopping
leave = stopping.StopFlag.__exit__
def left(self, *exc):
    result = leave(self, *exc)
    if self.requested:
        at("stopped", "stopped")
    return result
stopping.StopFlag.__exit__ = left

class Exiting:  # deleted with this module's globals, after the interpreter reset its signal handlers
    def __del__(self, moments=moments, open=open, marker=str(marker), kill=os.kill, pid=os.getpid()):
        if "term@exiting" in moments:  # no module is to be relied on by now: all it needs is bound here
            with open(marker, "a") as f:
                f.write("exiting\\n")
            kill(pid, 15)
exiting = Exiting()

from slope.cli.main import main
sys.exit(main())
"""


def log_of(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".log")  # outside the run directory, which must not exist yet


def run_to_end(command: list[str], run_dir: Path) -> None:
    with open(log_of(run_dir), "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, f"{command[3:]} exited {result.returncode}:\n{log_of(run_dir).read_text()[-3000:]}"


def launch(command: list[str], run_dir: Path, moments: str) -> tuple[subprocess.Popen, Path]:
    """Start `command` (a `python -m slope ...` one) through the launcher with SLOPE_TEST_PAUSE=`moments`;
    the process and its marker file."""
    launcher, marker = run_dir.with_name("launch.py"), run_dir.with_name(run_dir.name + ".paused")
    launcher.write_text(LAUNCHER)
    marker.unlink(missing_ok=True)
    env = {**os.environ, "SLOPE_TEST_PAUSE": moments, "SLOPE_TEST_MARKER": str(marker)}
    assert command[1:3] == ["-m", "slope"]
    with open(log_of(run_dir), "a") as log:
        proc = subprocess.Popen([command[0], str(launcher), *command[3:]], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    return proc, marker


def kill_at(command: list[str], run_dir: Path, pause: str) -> str:
    """Run `command` through the launcher until it stops itself at `pause`, SIGKILL it there; returns what
    the launcher says it stopped at (a .tmp- directory's name, or "plotting")."""
    proc, marker = launch(command, run_dir, pause)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.05)
        assert marker.exists(), f"never reached {pause} (exit {proc.poll()}):\n{log_of(run_dir).read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)  # stopped at the moment (or between the marker and SIGSTOP)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        return marker.read_text().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def sigterm_at(command: list[str], run_dir: Path, moments: list[str]) -> tuple[int, list[str]]:
    """Run `command` through the launcher, which sends itself SIGTERM at each of `moments`, to its end: its
    exit code, and the moments it reached (the .tmp- directory's name for writing:N)."""
    proc, marker = launch(command, run_dir, ",".join(f"term@{m}" for m in moments))
    try:
        code = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return code, marker.read_text().split() if marker.exists() else []


def checkpoint_names(run_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(run_dir / "checkpoints"))
    except OSError:  # not created yet
        return []


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


def test_kills_and_a_sigterm_during_checkpoint_writes_and_resumes(train_file, reference, tmp_path):
    run_dir = tmp_path / "run"
    # half-way through writing checkpoint 4: the resume must drop the incomplete copy, go back to step 2
    seen = kill_at(train_command(run_dir, train_file), run_dir, "writing:4")
    assert seen == ".tmp-step_00000004" and seen in checkpoint_names(run_dir)
    assert not (run_dir / "checkpoints" / seen / "manifest.json").exists()
    # a scheduler's SIGTERM while the resume writes checkpoint 6: that write completes, step 7 (the one in
    # flight by the time the loop looks) is trained and checkpointed, exit 143; the same signal again once
    # the loop is left, and again while the interpreter shuts down, changes nothing
    code, reached = sigterm_at(resume_command(run_dir), run_dir, ["writing:6", "stopped", "exiting"])
    text = log_of(run_dir).read_text()
    assert (code, reached) == (143, [".tmp-step_00000006", "stopped", "exiting"]), text[-3000:]
    assert text.count("slope train: SIGTERM at step 7: checkpoint written to") == 1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    assert (run_dir / "checkpoints" / "step_00000007" / "manifest.json").is_file()
    assert not [n for n in checkpoint_names(run_dir) if n.startswith(".")]
    # the resumed process dies too, with a checkpoint after the adapters joined complete but not in place:
    # the next resume must put that copy in place and go on from it
    seen = kill_at(resume_command(run_dir), run_dir, "renaming:10")
    assert seen == ".tmp-step_00000010" and (run_dir / "checkpoints" / seen / "manifest.json").is_file()
    assert "step_00000010" not in checkpoint_names(run_dir)
    run_to_end(resume_command(run_dir), run_dir)
    check_run(run_dir, reference)


def test_kill_in_the_final_evaluation(train_file, reference, tmp_path):
    run_dir = tmp_path / "run"
    # the final checkpoint and evaluation are written, summary.json not yet (the curves are being drawn):
    # the resume has no step left to train, and must neither log a NaN loss nor the final eval twice
    assert kill_at(train_command(run_dir, train_file), run_dir, "plotting") == "plotting"
    assert (run_dir / "checkpoints" / FINAL / "manifest.json").is_file()
    assert not (run_dir / "summary.json").exists()
    run_to_end(resume_command(run_dir), run_dir)
    check_run(run_dir, reference)
