"""Does a run survive SIGKILL at any moment, and stop cleanly on SIGTERM? Interrupt, resume, compare bitwise.

Each trial starts a fresh 12-step tiny run (dropout on, adapters joining before step 10, a checkpoint
every 2 steps), interrupts it at a moment of one kind, runs `slope train --resume` until it finishes, and
compares with one uninterrupted run of the same config:
- weights: every tensor of the final checkpoint's model.safetensors equal bitwise (torch.equal);
- metrics: metrics.jsonl has no duplicated (kind, set, step) record and steps strictly increase per stream;
- summary: summary.json (and metrics.jsonl) hold no NaN or infinity.
SIGKILL kinds (no handler runs: the OOM killer, a power cut, the end of a scheduler's grace period), in turn:
    random   a seeded random delay after a seeded training step (2 to 12) is logged: anywhere from
             the first checkpoint to the final evaluation and plots (before the first checkpoint there
             is nothing to resume, by design)
    write    while a checkpoint is being written (its .tmp-step_ directory exists; the step is seeded)
    swap     while a step is written again and its old copy is moved aside (an .old-step_ directory
             exists): the run is killed after checkpoint N (seeded) and `latest` is set back to N-2,
             the state a kill between a checkpoint's rename and the update of `latest` leaves; the
             resume then rewrites N and is killed when the swap is seen (polled without sleeping; the
             window is about a millisecond, so not every trial hits it: `hit` says which did)
    resume   at a random moment, then the first resume too, at a random moment past the killed one
`hit` records whether the killed process really died at that moment: for write and swap, whether the
.tmp-/.old- directory is still there after the kill; for resume, whether both processes were killed.
SIGTERM kinds (what a cluster scheduler sends before it preempts a job), in turn:
    term        a seeded random delay after a seeded training step (1 to 12) is logged
    term-write  while a periodic checkpoint (seeded, 2 to 10) is being written
    term-twice  as term, and SIGTERM again a seeded 0 to 0.5 s later: the repeat must change nothing
The run must then stop as docs/training.md promises: exit 143, `SIGTERM at step N` printed once, N the
step logged when the signal came or the one in flight, checkpoint N complete (it passes `slope check`'s
checks), named by `latest`, no .tmp-/.old- directory left. A signal after the last step is logged may
instead end the run normally (exit 0) or kill it (exit -15: the final checkpoint, evaluation and plots
are written after the training loop, where SIGTERM has its default action); either is recorded as
`after the last step`. `hit` says whether the signal reached the training loop (exit 143); for
term-write, also while the .tmp- directory existed. `stopped` says whether the stop kept that promise.

    python benchmarks/kill_resume.py              # 30 SIGKILL + 15 SIGTERM trials, ~10-20 min on 2 CPU cores
    python benchmarks/kill_resume.py --quick      # 5 + 3 trials
    python benchmarks/kill_resume.py --trials 60 --term-trials 30 --seed 1

Writes benchmarks/results/kill_resume.{json,md}. Not part of CI (tests/test_kill_resume.py runs a few).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # benchmarks/ is run as scripts: found through the path entry above

MAX_STEPS = 12


def _name(step: int) -> str:
    return f"step_{step:08d}"


FINAL = _name(MAX_STEPS)  # the last checkpoint
KINDS = ("random", "write", "swap", "resume")
TERM_KINDS = ("term", "term-write", "term-twice")
RUN_TIMEOUT = 300  # seconds for one process; a hung process is a failed trial, never a hung benchmark
MAX_RESUMES = 3  # plain resumes after the kills; a run that needs more is recorded as failed


@dataclass
class Trial:
    trial: int
    kind: str
    moment: str = ""  # what the poller saw when it killed (or "not killed: exited N")
    hit: bool = False  # the process died at that moment (see the module docstring)
    kills: int = 0
    resumes: int = 0
    signalled_after: int | None = None  # SIGTERM kinds: the last step logged when the signal went out
    exit_code: int | None = None  # SIGTERM kinds: how the signalled process ended (-15: killed by the signal)
    stopped_at: int | None = None  # SIGTERM kinds: the step of the checkpoint it stopped with
    stopped: bool | None = None  # SIGTERM kinds: the stop kept the promise (see the module docstring)
    weights_equal: bool = False
    metrics_clean: bool = False
    summary_finite: bool = False
    error: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def issues(self) -> list[str]:
        return self.problems + ([self.error] if self.error else [])

    @property
    def survived(self) -> bool:
        return (self.weights_equal and self.metrics_clean and self.summary_finite and not self.error
                and self.stopped is not False)


# ---- processes ------------------------------------------------------------------------------------


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
    return run_dir.with_name(run_dir.name + ".log")


def start(command: list[str], run_dir: Path) -> subprocess.Popen:
    with open(log_of(run_dir), "a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def names(run_dir: Path) -> list[str]:
    try:
        return os.listdir(run_dir / "checkpoints")
    except OSError:
        return []


def kill_when(proc: subprocess.Popen, moment, poll_s: float = 0.001, signum: int = signal.SIGKILL,
              then=None) -> str:
    """Send `signum` to `proc` as soon as `moment()` returns a name, call `then()` (if given), wait for the
    exit; that name (with what `then` returned), or "not killed: exited N"."""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen = moment()
            if seen:
                proc.send_signal(signum)
                seen += then() if then else ""
                try:  # SIGTERM: the step in flight and a checkpoint come first
                    proc.wait(timeout=30 if signum == signal.SIGKILL else RUN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    seen += "; did not exit"
                return seen
            if poll_s:
                time.sleep(poll_s)
        return f"not killed: exited {proc.poll()}"
    finally:
        if proc.poll() is None:  # the deadline passed: never leave a process behind
            proc.kill()
            proc.wait(timeout=30)


def logged_step(run_dir: Path) -> int:
    """The last training step metrics.jsonl holds (0 before any)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.startswith('{"kind": "train"') and line.endswith("}")]
    return max(steps, default=0)


def random_moment(rng: random.Random, run_dir: Path, first_step: int, after_checkpoint: bool = True):
    """A seeded moment of training: a random delay after step s (first_step..MAX_STEPS) is logged.

    Counted in steps, not seconds from the start, so that it lands inside training however loaded the
    machine is; after the last step the delay is longer, to reach into the final evaluation and plots.
    after_checkpoint: not before the first checkpoint (a run killed there has nothing to resume, by
    design; SIGTERM writes one).
    """
    s = rng.randint(first_step, MAX_STEPS)
    delay = rng.uniform(0, 2.0 if s == MAX_STEPS else 0.25)
    state = {"t0": None}

    def moment():
        if state["t0"] is None and (_latest(run_dir) or not after_checkpoint) and logged_step(run_dir) >= s:
            state["t0"] = time.monotonic()
        if state["t0"] is not None and time.monotonic() - state["t0"] >= delay:
            return f"step {s} logged+{delay:.2f}s"
        return None
    return moment


def tail(run_dir: Path, lines: int = 3) -> str:
    # the report must not name this machine's folders
    text = log_of(run_dir).read_text(errors="replace").replace(str(run_dir), "RUN_DIR").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])


# ---- checks ---------------------------------------------------------------------------------------


def non_finite_keys(value, prefix="") -> list[str]:
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in non_finite_keys(v, f"{prefix}{key}.")]
    if isinstance(value, float) and not math.isfinite(value):
        return [prefix.rstrip(".")]
    return []


def check(trial: Trial, run_dir: Path, reference: dict) -> None:
    weights_file = run_dir / "checkpoints" / FINAL / "model.safetensors"
    if not weights_file.is_file():
        trial.problems.append(f"no {FINAL}/model.safetensors")
    else:
        weights = load_file(weights_file)
        trial.weights_equal = weights.keys() == reference.keys() and all(
            torch.equal(weights[k], reference[k]) for k in reference)
        if not trial.weights_equal:
            trial.problems.append("weights differ")

    metrics = run_dir / "metrics.jsonl"
    records = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line a kill cut short, left in the log
            trial.problems.append(f"metrics: unreadable line {line[:40]!r}")
    last: dict[tuple, int] = {}
    for r in records:
        stream = (r.get("kind"), r.get("set"))
        if r.get("step", -1) <= last.get(stream, -1):
            trial.problems.append(f"metrics: {'/'.join(filter(None, stream))} step {r.get('step')} after {last[stream]}")
        last[stream] = max(r.get("step", -1), last.get(stream, -1))
        trial.problems += [f"metrics: {k} non-finite at {stream[0]} step {r.get('step')}" for k in non_finite_keys(r)]
    trial.metrics_clean = bool(records) and last.get(("train", None)) == MAX_STEPS and not any(
        p.startswith("metrics") for p in trial.problems)

    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        trial.problems.append("no summary.json")
        return
    bad = non_finite_keys(json.loads(summary_file.read_text()))
    trial.summary_finite = not bad
    trial.problems += [f"summary: {k} is not finite" for k in bad]


# ---- one trial ------------------------------------------------------------------------------------


def run_trial(trial: Trial, rng: random.Random, run_dir: Path, train_file: Path) -> None:
    proc = start(train_command(run_dir, train_file), run_dir)
    if trial.kind in ("random", "resume"):
        trial.moment = kill_when(proc, random_moment(rng, run_dir, 2))
        trial.hit = not trial.moment.startswith("not killed")
    elif trial.kind == "write":
        step = rng.randrange(4, MAX_STEPS + 1, 2)  # a kill while the first is written leaves nothing to resume
        trial.moment = kill_when(proc, lambda: next(
            (n for n in names(run_dir) if n.startswith(".tmp-step_") and int(n[-8:]) >= step), None))
        trial.hit = trial.moment in names(run_dir)
    else:  # swap: after checkpoint `step`, with `latest` one behind, so that the resume writes `step` again
        step = rng.randrange(4, MAX_STEPS, 2)
        trial.moment = kill_when(proc, lambda: f"latest=step {step}" if _latest(run_dir) == _name(step) else None)
        if not trial.moment.startswith("not killed"):
            (run_dir / "checkpoints" / "latest").write_text(_name(step - 2) + "\n")
    trial.kills += not trial.moment.startswith("not killed")

    if trial.kind in ("resume", "swap") and trial.kills:
        trial.resumes += 1
        proc = start(resume_command(run_dir), run_dir)
        if trial.kind == "resume":
            # past what the killed run logged: its records stay in metrics.jsonl until the resume trims them
            seen = kill_when(proc, random_moment(rng, run_dir, min(logged_step(run_dir) + 1, MAX_STEPS)))
            trial.hit = trial.hit and not seen.startswith("not killed")
        else:
            seen = kill_when(proc, _swap_watch(run_dir, _name(step)), poll_s=0)
            trial.hit = seen in names(run_dir)
        trial.moment += f"; resume: {seen}"
        trial.kills += not seen.startswith("not killed")
    resume_to_end(trial, run_dir)


def resume_to_end(trial: Trial, run_dir: Path) -> None:
    """Plain resumes until summary.json is written (at most MAX_RESUMES); a failed one is the trial's error."""
    for _ in range(MAX_RESUMES):
        if (run_dir / "summary.json").exists():
            break
        trial.resumes += 1
        with open(log_of(run_dir), "a") as log:
            try:
                rc = subprocess.run(resume_command(run_dir), stdout=log, stderr=subprocess.STDOUT,
                                    timeout=RUN_TIMEOUT).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0:
            trial.error = f"resume exited {rc}: {tail(run_dir)}"
            break


def run_term_trial(trial: Trial, rng: random.Random, run_dir: Path, train_file: Path) -> None:
    """SIGTERM the run at a moment of the trial's kind, check how it stopped, resume it to the end."""
    proc = start(train_command(run_dir, train_file), run_dir)
    if trial.kind == "term-write":  # a periodic checkpoint: the final one is written after the training loop
        step = rng.randrange(2, MAX_STEPS, 2)

        def moment():
            return next((n for n in names(run_dir) if n.startswith(".tmp-step_") and int(n[-8:]) >= step), None)
    else:
        moment = random_moment(rng, run_dir, 1, after_checkpoint=False)
    again = rng.uniform(0, 0.5) if trial.kind == "term-twice" else None
    writing = []

    def then() -> str:  # at once: what the run had done when the signal went out; then any repeat
        trial.signalled_after = logged_step(run_dir)
        writing.extend(n for n in names(run_dir) if n.startswith(".tmp-"))
        if again is None:
            return ""
        time.sleep(again)
        if proc.poll() is not None:
            return f"; again +{again:.2f}s: had exited"
        proc.send_signal(signal.SIGTERM)
        return f"; again +{again:.2f}s"

    trial.moment = kill_when(proc, moment, signum=signal.SIGTERM, then=then)
    trial.exit_code = proc.returncode
    trial.kills += not trial.moment.startswith("not killed")
    check_stop(trial, run_dir, trial.signalled_after)
    trial.hit = trial.exit_code == 128 + signal.SIGTERM and (trial.kind != "term-write" or bool(writing))
    resume_to_end(trial, run_dir)


def check_stop(trial: Trial, run_dir: Path, sent_at: int | None) -> None:
    """Did the SIGTERM stop keep docs/training.md's promise? Sets `stopped` (and `stopped_at`), or adds problems."""
    from slope.io import checkpoint
    from slope.io.format import FormatError

    if sent_at is None:  # the run ended before the moment came: nothing was signalled
        return
    if trial.exit_code != 128 + signal.SIGTERM:
        # after the last step the training loop is over: a normal end, or the signal's default action
        trial.stopped = sent_at == MAX_STEPS and trial.exit_code in (0, -signal.SIGTERM)
        if trial.stopped:
            trial.moment += "; after the last step"
        else:
            trial.problems.append(f"SIGTERM after step {sent_at}: exit {trial.exit_code}, expected 143")
        return
    said = [line for line in log_of(run_dir).read_text(errors="replace").splitlines()
            if line.startswith("slope train: SIGTERM at step ")]
    if len(said) != 1:
        trial.problems.append(f"{len(said)} 'SIGTERM at step' lines, expected 1")
        return
    trial.stopped_at = int(said[0].split()[5].rstrip(":"))
    problems = []
    if trial.stopped_at not in (sent_at, sent_at + 1):
        problems.append(f"stopped at step {trial.stopped_at}, signalled after step {sent_at}")
    if _latest(run_dir) != _name(trial.stopped_at):
        problems.append(f"latest is {_latest(run_dir)}, not step {trial.stopped_at}")
    problems += [f"{n} left behind" for n in names(run_dir) if n.startswith((".tmp-", ".old-"))]
    try:
        checkpoint.check_checkpoint(run_dir / "checkpoints" / _name(trial.stopped_at))
    except (FormatError, OSError) as err:
        problems.append(f"checkpoint {trial.stopped_at} fails the checks: {err}")
    trial.stopped = not problems
    trial.problems += problems


def _latest(run_dir: Path) -> str | None:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None


def _swap_watch(run_dir: Path, name: str):
    """Sleep-poll until checkpoint `name` is being rewritten (.tmp-), then spin until its old copy moves aside."""
    tmp, old = f".tmp-{name}", f".old-{name}"

    def moment():
        found = names(run_dir)
        if old in found:
            return old
        if tmp not in found:
            time.sleep(0.001)
        return None
    return moment


# ---- the benchmark --------------------------------------------------------------------------------


def reference_run(root: Path, train_file: Path) -> tuple[dict, float]:
    """The uninterrupted run's final weights, and its wall time (seconds)."""
    run_dir = root / "reference"
    t0 = time.monotonic()
    with open(log_of(run_dir), "a") as log:
        rc = subprocess.run(train_command(run_dir, train_file), stdout=log, stderr=subprocess.STDOUT,
                            timeout=RUN_TIMEOUT).returncode
    if rc != 0:
        raise SystemExit(f"the reference run failed: {tail(run_dir, 20)}")
    return load_file(run_dir / "checkpoints" / FINAL / "model.safetensors"), time.monotonic() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="SIGKILL trials")
    parser.add_argument("--term-trials", type=int, default=15, help="SIGTERM trials")
    parser.add_argument("--quick", action="store_true", help="5 SIGKILL and 3 SIGTERM trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    plan = [KINDS[i % len(KINDS)] for i in range(5 if args.quick else args.trials)]
    plan += [TERM_KINDS[i % len(TERM_KINDS)] for i in range(3 if args.quick else args.term_trials)]

    from slope.train import corpus

    t_start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="slope-kill-resume-"))
    try:
        train_file = root / "train.txt"
        works = dict(corpus.embedded_documents("shakespeare"))
        train_file.write_text(works["shakespeare:macbeth_gut.txt"][:60_000])
        reference, reference_seconds = reference_run(root, train_file)
        print(f"reference run: {reference_seconds:.1f} s", flush=True)
        trials = []
        for i, kind in enumerate(plan):
            trial = Trial(i, kind)
            t0 = time.monotonic()
            run_dir = root / f"trial{i:03d}"
            trial_run = run_term_trial if kind in TERM_KINDS else run_trial
            trial_run(trial, random.Random(args.seed * 100_003 + i), run_dir, train_file)
            check(trial, run_dir, reference)
            trial.seconds = round(time.monotonic() - t0, 1)
            trials.append(trial)
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"{i:3d} {trial.kind:<10} {'ok  ' if trial.survived else 'FAIL'} hit={trial.hit!s:<5} "
                  f"{trial.moment:<45} {'; '.join(trial.issues)}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    metrics = summarize(trials, time.monotonic() - t_start)
    for k, v in metrics.items():
        print(f"{k}: {v}")
    rows = [{**asdict(t), "survived": t.survived} for t in trials]
    path = _report.write("kill_resume", metrics, rows, *report_tables(trials, reference_seconds))
    print(f"wrote {path}")
    return 0 if metrics["survived"] == metrics["trials"] else 1


def summarize(trials: list[Trial], wall_seconds: float) -> dict:
    by_kind = {k: [t for t in trials if t.kind == k] for k in KINDS + TERM_KINDS}
    termed = [t for k in TERM_KINDS for t in by_kind[k]]
    return {
        "trials": len(trials),
        "survived": sum(t.survived for t in trials),
        "kills": sum(t.kills for t in trials if t.kind in KINDS),
        "kills_during_write": sum(t.hit for t in by_kind["write"]),
        "kills_during_swap": sum(t.hit for t in by_kind["swap"]),
        "swap_attempts": len(by_kind["swap"]),
        "resumes_killed": sum(t.kills > 1 for t in trials),
        "sigterm_trials": len(termed),
        "sigterm_exit_143": sum(t.exit_code == 128 + signal.SIGTERM for t in termed),
        "sigterm_during_write": sum(t.hit for t in by_kind["term-write"]),
        "sigterm_repeated": sum("; again" in t.moment and "had exited" not in t.moment for t in termed),
        "sigterm_after_last_step": sum("after the last step" in t.moment for t in termed),
        "sigterm_stopped_as_promised": sum(t.stopped is not False for t in termed),
        "weights_equal": sum(t.weights_equal for t in trials),
        "metrics_clean": sum(t.metrics_clean for t in trials),
        "summary_finite": sum(t.summary_finite for t in trials),
        "errors": sum(bool(t.error) for t in trials),
        **{f"survived_{k}": f"{sum(t.survived for t in ts)}/{len(ts)}" for k, ts in by_kind.items() if ts},
        "wall_seconds": round(wall_seconds, 1),
    }


def report_tables(trials: list[Trial], reference_seconds: float) -> tuple[str, str]:
    """The markdown table of trials, and the notes under it."""
    header = ("| # | kind | moment | hit | kills | resumes | signalled after | exit | stopped at | weights equal | "
              "metrics clean | summary finite | survived | problems |")
    table = [header, "|" + "---|" * (header.count("|") - 1)]
    for t in trials:
        problems = "; ".join(t.issues).replace("|", "/")
        after, exit_code, stopped_at = ("" if v is None else v for v in (t.signalled_after, t.exit_code, t.stopped_at))
        table.append(f"| {t.trial} | {t.kind} | {t.moment} | {t.hit} | {t.kills} | {t.resumes} | {after} | "
                     f"{exit_code} | {stopped_at} | {t.weights_equal} | {t.metrics_clean} | {t.summary_finite} | "
                     f"{t.survived} | {problems} |")
    counts = Counter(p for t in trials for p in t.issues)
    notes = ["## Problems, by how many trials showed them", ""]
    notes += [f"- {n}x {p}" for p, n in counts.most_common()] or ["- none"]
    notes += ["", f"Reference run: {reference_seconds:.1f} s wall; "
              "`hit` for swap trials says whether the kill landed while .old- existed (the window is ~1 ms); "
              "`kills` counts the SIGTERMs sent for SIGTERM trials (a repeat not counted); `signalled after` is "
              "the last step metrics.jsonl held when SIGTERM went out (steps take ~20 ms, so several may pass "
              "within a moment's delay); `exit` is the signalled process's exit code (-15: ended by the signal "
              "itself, after the training loop)."]
    return "\n".join(table), "\n".join(notes)


if __name__ == "__main__":
    sys.exit(main())
