"""How a run ends before its last step, and the line that says so.

Ctrl-C, SIGTERM and SIGHUP finish the step in progress and write a checkpoint (`StopFlag`,
`Interrupted`, exit 128 + the signal's number: 130, 143, 129);
out of memory and a non-finite loss stop the run with what to change and which checkpoint is kept
(`TrainingFailed`, exit 3). `slope.cli.commands.train` turns each into its exit code.
"""

from __future__ import annotations

import atexit
import logging
import signal
from pathlib import Path

import torch

from slope.io import checkpoint
from slope.train.runconfig import RunConfig

log = logging.getLogger("slope")


class TrainingFailed(Exception):
    """The run stopped on its own (non-finite loss, out of memory); the message says what is kept."""


class Interrupted(Exception):
    """A stop signal during training: a checkpoint was written, the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for a process ended by that signal


class StopFlag:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP set a flag the loop checks between steps, so a checkpoint is
    never half a step. SIGTERM is what a cluster scheduler sends before it preempts a job (then SIGKILL
    after a grace period); SIGHUP what a closed terminal sends.

    A second Ctrl-C raises KeyboardInterrupt at once (the default behaviour); a repeated SIGTERM or
    SIGHUP changes nothing: the checkpoint is already on its way. That holds until the process has
    exited, so that a repeat while the stopped run exits (the scheduler's again, or the SIGTERM torchrun
    sends a rank still exiting once another rank has exited) cannot turn exit 143 into death by the
    signal: once a stop was requested, leaving the block restores SIGINT's handler only, and at exit
    (atexit, before the interpreter's shutdown resets Python's handlers to the default action, which
    with torch loaded takes a second or two) SIGTERM and SIGHUP are ignored. SIGKILL still ends it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = False
        self.signum = signal.SIGINT
        self._previous: dict = {}

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested, self.signum = True, signum
        again = " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""
        log.warning("%s: finishing this step, writing a checkpoint%s", signal.Signals(signum).name, again)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if not self.requested or signum == signal.SIGINT:
                signal.signal(signum, previous)
        if self.requested:
            atexit.unregister(_ignore_repeats_while_exiting)  # once, however many stops
            atexit.register(_ignore_repeats_while_exiting)
        return False


def _ignore_repeats_while_exiting() -> None:
    """At the exit of a process that stopped on a signal: an ignored signal, unlike a handled one, stays
    so through the interpreter's shutdown. Not earlier: the programs a process starts inherit it."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's RuntimeError saying the same."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def kept_checkpoint(run_dir: Path, main: bool) -> str:
    """Which checkpoint a stopped run leaves to resume from, as the end of its error line."""
    if not main:
        return "rank 0 names the last good checkpoint"
    latest = checkpoint.latest_checkpoint(run_dir)
    return f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"


def out_of_memory(step: int, cfg: RunConfig, kept: str) -> TrainingFailed:
    """Step `step` (1-based) ran out of memory: what to lower, and what is kept."""
    return TrainingFailed(
        f"out of memory at step {step} with train.batch_size={cfg.train.batch_size}, "
        f"train.seq_len={cfg.train.seq_len}: lower train.batch_size (and raise train.grad_accum "
        f"to keep the tokens per step); {kept}"
    )


def non_finite_loss(loss: float, step: int, kept: str) -> TrainingFailed:
    """Step `step` (1-based) gave a NaN or infinite loss: what to change, and what is kept."""
    return TrainingFailed(
        f"the loss became {loss} at step {step}: training stopped; lower optim.lr or "
        f"raise optim.warmup_steps; {kept}"
    )


def interrupted(step: int, path: Path, run_dir: Path, signum: int = signal.SIGINT) -> Interrupted:
    """A stop signal after `step` complete steps, saved to checkpoint `path`: how to continue."""
    return Interrupted(
        f"{signal.Signals(signum).name} at step {step}: checkpoint written to {path}; continue with "
        f"`slope train --resume {run_dir}`", signum,
    )
