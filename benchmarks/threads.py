"""Two 1-thread runs at a time or one 2-thread run: which finishes a study of CPU runs sooner?

    python benchmarks/threads.py [--steps 60] [--cores 2] [-- extra slope train overrides]

The accuracy study (benchmarks/accuracy.py) trains many independent runs of the default 8.4M model on
CPU. On a machine with C cores it can run one C-thread run at a time (`--jobs 1 --threads C`) or C
1-thread runs side by side (`--jobs C --threads 1`). This measures both, in one invocation, on the
study's own model and batch: the default config, trained for `--steps` steps from a prepared token
folder (so no tokenizer training is timed), without evaluation or checkpoints.

Throughput is training tokens per second of wall time, from each run's per-step log: the median over
the steps after the first 5 (warm-up), summed over the runs that ran side by side. The ratio
`side_by_side_over_one` above 1 means `--jobs C --threads 1` finishes the study sooner. The bound
next to it is C: C independent runs can at most be C times one run that gets no benefit from its
extra threads.

Run it on an otherwise idle machine (stop other CPU work first: anything else running changes both
settings, and not equally). Writes benchmarks/results/threads.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report

WARMUP_STEPS = 5


def prepare(out: Path) -> Path:
    """The default config's training text, tokenized once with its vocabulary size."""
    prepared = out / "prepared"
    subprocess.run([sys.executable, "-m", "slope", "prepare", "shakespeare", "-o", str(prepared),
                    "--vocab-size", "8192"], check=True, stdout=subprocess.DEVNULL)
    return prepared


def start_run(run_dir: Path, prepared: Path, threads: int, steps: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "slope", "train", "--run-dir", str(run_dir), "--no-progress",
               f"--data.train={prepared}", "--data.val=", f"--train.max_steps={steps}", "--train.log_every=1",
               "--eval.every=0", "--eval.sets=[]", "--eval.final_max_tokens=256", f"--checkpoint.every={steps}",
               f"--run.threads={threads}", *extra]
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process, below)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    return proc


def steady_tokens_per_s(run_dir: Path) -> float:
    """The median training tokens/s of the run's logged steps after the warm-up."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r["step"] > WARMUP_STEPS]
    if not rates:
        raise SystemExit(f"{run_dir}: no steps after the first {WARMUP_STEPS} were logged; give more --steps")
    return statistics.median(rates)


def measure(work: Path, prepared: Path, runs: int, threads: int, steps: int, extra: list[str]) -> dict:
    """`runs` runs of `threads` threads each, started together; their summed steady throughput."""
    start = time.perf_counter()
    procs = {work / f"{runs}x{threads}-{i}": None for i in range(runs)}
    for run_dir in procs:
        procs[run_dir] = start_run(run_dir, prepared, threads, steps, extra)
    for run_dir, proc in procs.items():
        code = proc.wait()
        proc.log.close()
        if code != 0:
            raise SystemExit(f"{run_dir} failed (exit {code}); see {run_dir.with_suffix('.log')}")
    wall = time.perf_counter() - start
    rates = [steady_tokens_per_s(run_dir) for run_dir in procs]
    return {"runs": runs, "threads_per_run": threads, "steps": steps, "wall_s": wall,
            "tokens_per_s_per_run": rates, "tokens_per_s_total": sum(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="C: the cores to fill (default: all)")
    parser.add_argument("extra", nargs="*", help="further slope train overrides, after --")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps, got {args.steps}")
    if args.cores < 2:
        parser.error(f"--cores must be at least 2 to compare anything, got {args.cores}")
    with tempfile.TemporaryDirectory(prefix="slope-threads-") as tmp:
        work = Path(tmp)
        prepared = prepare(work)
        one = measure(work, prepared, 1, args.cores, args.steps, args.extra)
        side = measure(work, prepared, args.cores, 1, args.steps, args.extra)
    ratio = side["tokens_per_s_total"] / one["tokens_per_s_total"]
    metrics = {"side_by_side_over_one": ratio, "bound": float(args.cores),
               "one_run_tokens_per_s": one["tokens_per_s_total"],
               "side_by_side_tokens_per_s": side["tokens_per_s_total"]}
    rows = [one, side]
    table = "\n".join([
        "| setting | runs | threads each | tokens/s (sum of the runs' medians) | wall s |",
        "|---|---|---|---|---|",
        *[f"| --jobs {r['runs']} --threads {r['threads_per_run']} | {r['runs']} | {r['threads_per_run']} "
          f"| {r['tokens_per_s_total']:,.0f} | {r['wall_s']:.0f} |" for r in rows],
    ])
    verdict = "side by side" if ratio > 1 else "one run with all threads"
    notes = (f"{args.cores} runs of 1 thread side by side give {ratio:.2f}x the throughput of one "
             f"{args.cores}-thread run (bound: {args.cores}x). On this machine the study is quicker with "
             f"{verdict}. Medians over steps {WARMUP_STEPS + 1}..{args.steps} of each run.")
    path = _report.write("threads", metrics, rows, table, notes)
    print(table)
    print(notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
