"""The default run's learning rate, decided the way the quality study decides a default: several seeds.

    python benchmarks/default_lr.py [--lrs 3e-3,2e-3] [--seeds 0,1,2] [--jobs 2] [--threads 1]
                                    [--runs-dir runs/bench-default-lr] [-- extra overrides]

Runs the default `slope train` (200 steps of the ~8.4M model on Shakespeare) for `--method dense` and
`--method slope` at every LR and seed given, as separate processes, `--jobs` at a time, each with
`--threads` torch threads; a run whose summary.json exists is not run again, so an interrupted benchmark
continues where it stopped. It reports, per method and LR, held-out Shakespeare and Milton bits per byte
(mean ± std over seeds), and for each LR after the first (today's default) the Δ against the first with its
standard error and the verdict of the study's rule (benchmarks/_study_report.py): adopt when the change
lowers held-out Shakespeare bits per byte by more than two standard errors without raising Milton's by more
than two. Writes benchmarks/results/default_lr.{json,md}. Quality only: runs side by side share the cores,
so their speeds are not compared (benchmarks/train_default.py measures speed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report
from benchmarks._study_report import GUARD, PRIMARY, _fmt_diff, default_verdict, difference, stats
from benchmarks.accuracy import _floats, _ints, _positive, run_env

METHODS = ("dense", "slope")
SETS = (PRIMARY, GUARD)


def run_dir(runs_dir: Path, method: str, lr: float, seed: int) -> Path:
    return runs_dir / f"{method}-lr{lr:g}-seed{seed}"


def train_command(method: str, lr: float, seed: int, directory: Path, threads: int, extra: list[str]) -> list[str]:
    """The default `slope train` with only the method, LR, seed and threads set (plus `extra`)."""
    return [sys.executable, "-m", "slope", "train", "--method", method, "--run-dir", str(directory),
            "--no-progress", f"--optim.lr={lr!r}", f"--run.seed={seed}", f"--run.threads={threads}", *extra]


def run_one(command: list[str], directory: Path, threads: int) -> None:
    """One run, its output in <run dir>.log; a failed run stops the benchmark with the log's name."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    log_path = directory.parent / f"{directory.name}.log"
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=run_env(threads)).returncode
    if code != 0:
        raise SystemExit(f"{directory.name} failed (exit {code}); see {log_path}")
    print(f"[{directory.name}] finished", flush=True)


def read_run(directory: Path) -> dict:
    summary = json.loads((directory / "summary.json").read_text())
    return {name: summary["eval"][name]["bpb"] for name in SETS}


def aggregate(method: str, lr: float, seeds: Sequence[int], runs: dict) -> dict:
    """The study report's row shape ({set}_bpb statistics, seeds_done) for one method at one LR."""
    done = {s: runs[(method, lr, s)] for s in seeds if (method, lr, s) in runs}
    row = {"method": method, "lr": lr, "seeds_done": sorted(done)}
    for name in SETS:
        row[f"{name}_bpb"] = stats([r[name] for r in done.values()])
    return row


def compare(rows: list[dict], lrs: Sequence[float], n_seeds: int) -> list[dict]:
    """For each method and each LR after the first: the Δ against the first LR and the rule's verdict."""
    by_key = {(r["method"], r["lr"]): r for r in rows}
    answers = []
    for method in METHODS:
        current = by_key.get((method, lrs[0]))
        for lr in lrs[1:]:
            verdict = default_verdict(current, by_key.get((method, lr)), n_seeds)
            answers.append({"method": method, "change": f"optim.lr {lrs[0]:g} -> {lr:g}", **verdict})
    return answers


def _fmt(s: dict | None) -> str:
    if s is None:
        return "—"
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")


def tables(rows: list[dict], answers: list[dict]) -> str:
    lines = ["| method | LR | seeds | Shakespeare held-out bits/byte | Milton bits/byte |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['lr']:g} | {len(r['seeds_done'])} | {_fmt(r[f'{PRIMARY}_bpb'])} | "
              f"{_fmt(r[f'{GUARD}_bpb'])} |" for r in rows]
    lines += ["", "| method | change | Δ Shakespeare bits/byte ± s.e. | Δ Milton bits/byte ± s.e. | verdict |",
              "|---|---|---|---|---|"]
    lines += [f"| {a['method']} | {a['change']} | {_fmt_diff(a['primary'])} | {_fmt_diff(a['guard'])} | "
              f"{a['verdict']} |" for a in answers]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=_floats, default=(3e-3, 2e-3), help="the first is today's default")
    parser.add_argument("--seeds", type=_ints, default=(0, 1, 2))
    parser.add_argument("--jobs", type=_positive, default=2)
    parser.add_argument("--threads", type=_positive, default=1)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench-default-lr")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run, e.g. --train.max_steps=20")
    args = parser.parse_args(argv)
    if len(args.lrs) < 2 or not args.seeds:
        parser.error("need at least two --lrs and one seed")
    keys = [(m, lr, s) for s in args.seeds for lr in args.lrs for m in METHODS]
    dirs = {k: run_dir(args.runs_dir, *k) for k in keys}
    todo = [k for k in keys if not (dirs[k] / "summary.json").exists()]
    print(f"default LR: {len(keys)} runs, {len(keys) - len(todo)} finished, {len(todo)} to run, "
          f"{args.jobs} at a time with {args.threads} thread(s) each; runs in {args.runs_dir}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, train_command(*k, dirs[k], args.threads, args.extra), dirs[k], args.threads)
                   for k in todo]
        for future in futures:
            future.result()
    runs = {k: read_run(dirs[k]) for k in keys}
    rows = [aggregate(m, lr, args.seeds, runs) for m in METHODS for lr in args.lrs]
    answers = compare(rows, args.lrs, len(args.seeds))
    metrics = {"runs": len(keys), "jobs": args.jobs, "threads_per_run": args.threads,
               **{f"{a['method']}: {a['change']}": a["verdict"] for a in answers}}
    by_key = {(r["method"], r["lr"]): r for r in rows}
    for lr in args.lrs:  # SLoPe against dense at each LR, as the README's default-run row compares them
        d = difference(by_key[("slope", lr)][f"{PRIMARY}_bpb"], by_key[("dense", lr)][f"{PRIMARY}_bpb"])
        metrics[f"shakespeare_bpb_slope_minus_dense_lr{lr:g}"] = d["diff"] if d else None
        metrics[f"shakespeare_bpb_slope_minus_dense_lr{lr:g}_se"] = d["se"] if d else None
    notes = (f"Mean ± sample std over seeds {', '.join(map(str, args.seeds))}; Δ: the LR's mean minus the first "
             "LR's, ± the standard error of the difference. Verdict: adopt = lowers held-out Shakespeare bits per "
             "byte by more than two standard errors without raising Milton's by more than two; keep = within two; "
             "worse = beyond two the wrong way. The default run validates on Shakespeare's held-out works, so "
             "unlike the quality study (which chooses on a slice of the training corpus) this chooses among a few "
             "LRs on a set it also reports; Milton, used for nothing else, is the guard. Each run: "
             f"{args.threads} torch thread(s), {args.jobs} run(s) side by side. Run directories: `{args.runs_dir}`.")
    path = _report.write("default_lr", metrics, rows + answers, tables(rows, answers), notes)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
