"""Kills, resumes on another number of processes, and a failing rank: bounded time, clear messages."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    MAX_STEPS,
    PER_RANK_BATCH,
    RUN_TIMEOUT,
    env,
    final_weights,
    log_of,
    run_job,
    torchrun,
    train_args,
    train_losses,
)
from test_dist_train import assert_same_run

from slope import cli


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (children first found, then theirs)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # the field after the parenthesised command name: state, then the parent's pid
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def start_until_checkpoint(command: list[str], run_dir: Path, step: int, log) -> subprocess.Popen:
    """Start `command` in its own session, writing to `log`; return once checkpoint `step` is complete
    (or the job ended, or RUN_TIMEOUT passed)."""
    done = run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json"
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not done.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def kill_after_checkpoint(command: list[str], run_dir: Path, step: int) -> None:
    """Start `command` (in its own session), SIGKILL the whole job once checkpoint `step` is complete."""
    done = run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json"
    with open(log_of(run_dir), "a") as log:
        proc = start_until_checkpoint(command, run_dir, step, log)
        # torchrun and every worker, no handler runs (torchrun puts its workers in sessions of their own)
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert done.is_file(), f"checkpoint {step} never appeared:\n{log_of(run_dir).read_text()[-3000:]}"


@pytest.mark.slow
def test_fsdp_killed_on_two_ranks_resumes_on_one(prepared, reference, tmp_path):
    run_dir = tmp_path / "run"
    kill_after_checkpoint([*torchrun(2), *train_args(run_dir, prepared, f"--train.batch_size={PER_RANK_BATCH}",
                                                     "--run.parallel=fsdp")], run_dir, step=2)
    # one process, FSDP on a group of one, twice the per-rank batch: the same global batch, resharded
    run_job([sys.executable, "-m", "slope", "train", "--resume", str(run_dir), "--no-progress",
             f"--train.batch_size={2 * PER_RANK_BATCH}"], run_dir)
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_fsdp_killed_on_one_process_resumes_on_two(prepared, reference, tmp_path):
    run_dir = tmp_path / "run"
    kill_after_checkpoint([sys.executable, *train_args(run_dir, prepared, f"--train.batch_size={2 * PER_RANK_BATCH}",
                                                       "--run.parallel=fsdp")], run_dir, step=2)
    run_job([*torchrun(2), "-m", "slope", "train", "--resume", str(run_dir), "--no-progress",
             f"--train.batch_size={PER_RANK_BATCH}"], run_dir)
    assert_same_run(run_dir, reference)


def same_world_args(parallel: str) -> list[str]:
    # dropout on: a resume that lost a rank's RNG state would differ; adapters join before step 4, so a
    # checkpoint resumed from after step 3 holds them and the resume rebuilds the wrapper with them
    return [f"--train.batch_size={PER_RANK_BATCH}", f"--run.parallel={parallel}", "--model.dropout=0.1",
            "--slope.adapter_start=0.5"]


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """uninterrupted(parallel): one 2-rank run with same_world_args, made once per mode for this module: what
    an interrupted 2-rank run resumed on 2 ranks must equal bit for bit (one process sums in another order)."""
    runs = {}

    def run(parallel: str) -> Path:
        if parallel not in runs:
            run_dir = tmp_path_factory.mktemp(f"whole-{parallel}") / "run"
            run_job([*torchrun(2), *train_args(run_dir, prepared, *same_world_args(parallel))], run_dir)
            runs[parallel] = run_dir
        return runs[parallel]
    return run


def assert_bit_exact(run_dir: Path, whole: Path) -> None:
    assert train_losses(run_dir) == train_losses(whole)
    a, b = final_weights(run_dir), final_weights(whole)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_and_resumed_on_the_same_world_is_bit_exact(parallel, prepared, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    kill_after_checkpoint([*torchrun(2), *train_args(run_dir, prepared, *same_world_args(parallel))], run_dir, step=4)
    run_job([*torchrun(2), "-m", "slope", "train", "--resume", str(run_dir), "--no-progress"], run_dir)
    assert_bit_exact(run_dir, uninterrupted(parallel))


LAUNCHER = """
import os, sys, time
if os.environ.get("RANK") == "1":  # the fault is injected on rank 1 only, from the test's side
    from slope.train import trainer
    step_once = trainer.Trainer._train_step
    def faulty(self):
        if self.step == 2:
            {fault}
        return step_once(self)
    trainer.Trainer._train_step = faulty
from slope.cli.main import main
sys.exit(main())
"""

FAULTS = {
    "raises": ('raise RuntimeError("injected fault")', "rank 1 of 2 failed: RuntimeError: injected fault"),
    "dies": ("os._exit(7)", "exitcode  : 7"),
    # rank 0 waits in the step's collective until run.dist_timeout, then fails and takes the job down
    "hangs": ("time.sleep(3600)", "rank 0 of 2 failed"),
}


@pytest.mark.parametrize("fault", [
    "raises", pytest.param("dies", marks=pytest.mark.slow), pytest.param("hangs", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_a_failing_rank_ends_the_job_with_its_reason(fault, parallel, prepared, tmp_path):
    code, message = FAULTS[fault]
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.replace("{fault}", code))
    run_dir = tmp_path / "run"
    command = [*torchrun(2), str(launcher), *train_args(run_dir, prepared, f"--train.batch_size={PER_RANK_BATCH}",
                                                          f"--run.parallel={parallel}", "--run.dist_timeout=20")[2:]]
    text = run_job(command, run_dir, expect=1, timeout=150)
    assert message in text, text[-3000:]
    # the last good checkpoint (step 2) is intact and resumable
    assert (run_dir / "checkpoints" / f"step_{2:08d}" / "manifest.json").is_file()
    assert MAX_STEPS > 2


def signal_and_wait(proc: subprocess.Popen, pids: list[int], signum: int) -> int:
    """Send `signum` to `pids` and wait for the job's exit code; a job that does not stop is killed and fails."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the job did not stop after {signal.Signals(signum).name}")


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_one_step_with_a_checkpoint(prepared, reference, tmp_path):
    """SIGINT to each worker (as a terminal's Ctrl-C reaches them): the ranks agree on the step, write one
    checkpoint and stop; the resumed run ends where one uninterrupted process ends."""
    run_dir = tmp_path / "run"
    command = [*torchrun(2), *train_args(run_dir, prepared, f"--train.batch_size={PER_RANK_BATCH}",
                                         "--run.parallel=ddp")]
    with open(log_of(run_dir), "a") as log:
        proc = start_until_checkpoint(command, run_dir, 2, log)
        signal_and_wait(proc, descendants(proc.pid), signal.SIGINT)  # the workers, not torchrun
    text = log_of(run_dir).read_text()
    if "SIGINT at step" in text:  # the signal came before the last step ended
        assert text.count("SIGINT at step") == 1, "rank 0 alone reports"
        run_job([*torchrun(2), "-m", "slope", "train", "--resume", str(run_dir), "--no-progress"], run_dir)
    assert_same_run(run_dir, reference)


# Runs `slope train` as a torchrun worker and appends to SLOPE_TEST_REPORT.<rank> the step it stopped at
# (`stopping.interrupted`, called once the stop checkpoint is written) and the exit code main returned.
REPORTER = """
import os, sys
from pathlib import Path
from slope.train import stopping
report = Path(os.environ["SLOPE_TEST_REPORT"] + "." + os.environ["RANK"])
made = stopping.interrupted
def interrupted(step, *args, **kwargs):
    report.write_text(f"step {step}\\n")
    return made(step, *args, **kwargs)
stopping.interrupted = interrupted
from slope.cli.main import main
code = main()
with report.open("a") as f:
    f.write(f"exit {code}\\n")
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("parallel", "signalled"), [("ddp", "workers"), ("fsdp", "workers"), ("ddp", "torchrun")])
def test_sigterm_stops_every_rank_at_one_step_and_resumes_bit_for_bit(parallel, signalled, prepared, uninterrupted,
                                                                      tmp_path, monkeypatch):
    """A scheduler's SIGTERM before preemption, to every worker (as Slurm signals every process of a job
    step) or to torchrun alone, whose agent forwards it to each worker and waits --shutdown-timeout (30 s)
    before SIGKILL: the ranks agree on one step, write its checkpoint and exit 143; torchrun exits 1."""
    run_dir = tmp_path / "run"
    reporter, report = tmp_path / "report.py", tmp_path / "report"
    reporter.write_text(REPORTER)
    monkeypatch.setenv("SLOPE_TEST_REPORT", str(report))  # conftest.env() passes it on to torchrun and its workers
    command = [*torchrun(2), str(reporter), *train_args(run_dir, prepared, *same_world_args(parallel))[2:]]
    with open(log_of(run_dir), "a") as log:
        proc = start_until_checkpoint(command, run_dir, 2, log)
        code = signal_and_wait(proc, descendants(proc.pid) if signalled == "workers" else [proc.pid], signal.SIGTERM)
    text = log_of(run_dir).read_text()
    reports = [report.with_name(f"report.{rank}").read_text().splitlines() for rank in (0, 1)]
    # both ranks stopped after the same step, past checkpoint 2, and exited 143
    assert reports[0] == reports[1] and reports[0][1:] == ["exit 143"], (reports, text[-3000:])
    step = int(reports[0][0].removeprefix("step "))
    assert 2 <= step < MAX_STEPS and code == 1, text[-3000:]
    if signalled == "workers":  # torchrun's table of failed workers: each rank with the code it exited with
        assert text.count("exitcode  : 143") == 2 and "Signal 15" not in text, text[-3000:]
    else:  # the agent re-raises the signal it handled once the workers are down
        assert f"SignalException: Process {proc.pid} got signal: 15" in text, text[-3000:]
    assert text.count(f"slope train: SIGTERM at step {step}: checkpoint written to") == 1  # rank 0 alone reports
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert cli.main(["check", str(ckpt)]) == 0
    run_job([*torchrun(2), "-m", "slope", "train", "--resume", str(run_dir), "--no-progress"], run_dir)
    assert_bit_exact(run_dir, uninterrupted(parallel))
