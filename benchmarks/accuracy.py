"""A fair quality study: SLoPe 2:4 against the dense model of the same shape and against the same
inference cost reached another way, each arm LR-swept and over several seeds.

    python benchmarks/accuracy.py --scale 8m                   # 8.4M parameters (the default run's model)
    python benchmarks/accuracy.py --scale 30m                  # ~29.5M parameters
    python benchmarks/accuracy.py --scale gpt2-small --train-data CORPUS   # GPT-2 small, on a GPU
    python benchmarks/accuracy.py --scale 8m --estimate        # the plan, runs left and their time
    python benchmarks/accuracy.py --scale 8m --report-only     # rewrite the report from the finished runs
    python benchmarks/accuracy.py --scale 8m --jobs 2 --threads 1   # two runs at a time, one thread each
    python benchmarks/accuracy.py --scale 8m --device cuda --jobs 8 --threads 1   # on a GPU (gpu_study.sh)
    python benchmarks/accuracy.py --quick                      # smoke test: tiny model, about a minute

It answers two questions: (1) how much quality does a 2:4 model lose against the dense model of the same
shape, and (2) is it better than the same inference cost reached another way: a dense model with as many
non-zero weights (half the blocks, the paper's "GPT2-Half"), or another sparse method. The default study:

| arm | LRs (seed 0) | what it answers |
|---|---|---|
| dense | grid | the dense model at init 1 (`--model.linear_init_scale=1.0`, dense's default before this study) |
| dense-init0.71 | grid | the FAIR dense baseline (`--model.linear_init_scale=0.7071`): it beats default-init dense |
| slope | grid | the paper's recipe (init 1, adapters for the last 1 % of steps) |
| slope-init0.71 | grid | does SLoPe gain from the same init? |
| dense-half | follows dense-init0.71 | `--model.num_layers=` half the blocks at init 0.7071: the 2:4 model's non-zero weights |
| adapters0.9@winning-init | follows the winner | `--slope.adapter_start=0.9`: do adapters close part of the gap? |
| srste@winning-init | follows the winner | SR-STE, the other sparse-from-scratch method |
| wanda@winning-init | follows the winner | Wanda: dense for half the steps, then pruned to 2:4 |

"The winner" is the SLoPe init arm (slope or slope-init0.71) with the lower final validation loss at its
chosen LR, decided once both sweeps have finished; each @winning-init slot then runs one concrete arm,
`slope-adapters0.9` / `slope-init0.71-adapters0.9`, `srste` / `srste-init0.71`, `wanda` / `wanda-init0.71`,
so every run JSON names exactly what it ran. Every arm in ARMS is also runnable by name (`--arms`), including
the controls dropped from the default study: dense-init0.93, dense-noclip and slope-nodp. An arm listed
without the arm it follows runs the full grid itself.

The rules, so that no arm is favoured:
- every arm trains on the same number of tokens (same steps, batch and sequence length);
- each arm gets its own learning rate, chosen by the lowest final validation loss at seed 0, where
  validation is the held-out last 5 % of the TRAINING corpus (`--data.val=`), never a set that is reported.
  The four family heads (dense, dense-init0.71, slope, slope-init0.71) sweep the scale's whole grid
  (8m: 1e-3, 2e-3, 4e-3). A follower sweeps two LRs: its head's best and ONE grid neighbour of it (at the
  grid's edge its only neighbour, else the neighbour with the lower head validation loss at seed 0);
  dense-half follows dense-init0.71, the @winning-init arms follow the winning SLoPe init arm;
- an arm whose best LR is the grid's smallest (largest) also runs at half (twice) that LR, and again while
  the best stays outside the grid, at most 2 LRs beyond its edge: a baseline tuned only to the grid's edge
  may be under-tuned, and every arm compared against it would look better than it is. Its seeds, and the
  arms that follow it, wait for these runs; a follower's neighbour is taken from its head's whole sweep;
- the other seeds then run at the chosen LR (seed 0 is reused from the sweep): seeds 0, 1, 2 at 8m;
- the reported sets, Shakespeare's held-out works and Milton, are evaluated once, at the end of each run,
  and only summarised (mean ± std over seeds; Δ bits per byte against the fair dense baseline and against
  dense-half, ± the standard error), never used to choose anything.

Runs: 4 heads x (3 LRs + 2 more seeds) + 4 followers x (2 LRs + 2 more seeds) = 20 + 16 = 36 at 8m and 30m,
plus one or two for each arm whose best LR is the grid's edge.
Fewer would mean dropping an LR point, a seed or an arm: a follower's second LR is what tells whether the
arm moved the optimum away from its head's, the three seeds are what the standard errors come from, and
each arm answers one of the two questions.

The study is resumable and meant to span several sessions: every finished run leaves one small JSON under
--out/runs/ (written atomically), a rerun of the same command skips those, and each run directory
(checkpoints, tokens) lives in --work and is deleted once its JSON is written, so a killed study loses at
most the runs in progress. The report (benchmarks/results/accuracy_<scale>.{json,md,png}) is rewritten after
every run from whatever has finished, naming the runs still missing. Run one study per --out at a time (two
processes on the same --out would train the same runs).

Threads and concurrency: `--threads N` (default: $OMP_NUM_THREADS if set, else torch's default) is passed
to every run as OMP_NUM_THREADS and MKL_NUM_THREADS and recorded in its JSON ("threads", with "jobs"); it is
not part of the settings, so runs at any thread count belong to one study. `--jobs N` (default 1) trains up
to N runs at once, in the same dependency order (a follower starts only once its head's sweep has finished;
an arm's seeds only once its own sweep has). On a 2-core machine two 1-thread runs at a time
(`--jobs 2 --threads 1`) train 1.18x the tokens per second of one 2-thread run (`--jobs 1 --threads 2`;
bound 2x), measured by `benchmarks/threads.py` on the study's model and batch
(benchmarks/results/threads.md): so the study runs `--jobs 2 --threads 1` there.

Time: on 2 CPU cores with `--jobs 2 --threads 1` and little else running, two 8m runs side by side take
about 30 minutes (1,784 and 1,848 s for dense-init0.71 at 5e-4 and SR-STE at 1e-3), so about 15 minutes
a run and 9 to 10 hours for the whole study; each run records its median step time, and `--estimate`
projects from those, not from wall times that include a suspended study or a busy machine. A 30m step
is about 3.3x the training FLOPs (train_flops_per_token), so until one 30m run has finished its
`--estimate` projects from the 8m runs.

Code: this file runs the study (one run, the study in dependency order, the time left, the command line);
its design and the order of its runs are benchmarks/_study_plan.py, its report benchmarks/_study_report.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report
from benchmarks._study_plan import (
    ARMS,
    SCALES,
    SHAPES,
    SLOTS,
    TEST_SETS,
    VAL_FRACTION,
    StudyError,
    arm_overrides,
    beyond_grid,
    breakdown,
    check_arms,
    finished,
    llama_parameters,
    pending,
    plan_table,
    planned,
    remaining,
    run_name,
    train_flops_per_token,
)
from benchmarks._study_report import contest_text, write_report

# ---- one run ----------------------------------------------------------------------------------------


def train_command(settings: dict, arm: str, lr: float, seed: int, run_dir: Path, device: str | None = None,
                  threads: int | None = None) -> list[str]:
    """The `slope train` command of one run: the scale's settings, then the arm's overrides, then --extra.
    `device` (cpu or cuda; None: slope's choice) and the scale's precision are not settings: runs of one
    study on a CPU and on a GPU at the same precision differ only in the order of float sums."""
    method = ARMS[arm][0]
    scale = SCALES.get(settings["scale"])
    placement = [f"--run.device={device}"] if device else []
    if threads:  # explicit: run.threads = auto would take fewer when the machine looked busy at the start
        placement.append(f"--run.threads={threads}")
    if scale is not None and scale.precision:
        placement.append(f"--run.precision={scale.precision}")
    steps = settings["steps"]
    command = [sys.executable, "-m", "slope", "train"]
    if settings["config"]:
        command += ["--config", settings["config"]]
    command += [
        "--method", method, "--run-dir", str(run_dir), "--no-progress",
        f"--optim.lr={lr:g}", f"--run.seed={seed}", f"--train.max_steps={steps}",
        f"--data.train={settings['train_data']}", "--data.val=", f"--data.val_fraction={VAL_FRACTION}",
        f"--eval.sets={','.join(TEST_SETS)}", f"--eval.every={settings['eval_every']}",
        # every step's grad norm and clip flag in metrics.jsonl, so the clip rate is exact, not sampled
        "--train.log_every=1",
        # one checkpoint, at the end (the run directory is deleted anyway); no TensorBoard files
        f"--checkpoint.every={steps}", "--checkpoint.keep_last=1", "--run.logger=none",
        *placement, *settings["model"], *settings["warmup"], *arm_overrides(arm, settings), *settings["extra"],
    ]
    return command


def run_env(threads: int | None, base: dict | None = None) -> dict[str, str]:
    """The environment of one run: this one's, with OMP_NUM_THREADS and MKL_NUM_THREADS set to `threads`."""
    env = dict(os.environ if base is None else base)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def default_threads() -> int:
    """$OMP_NUM_THREADS when it is set (to a positive integer), else torch's default."""
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    import torch

    return torch.get_num_threads()


def summarize_run(run_dir: Path) -> dict:
    """What the report needs from a finished run directory: final evaluations, the validation curve,
    grad-norm statistics and the clip rate (from metrics.jsonl), timings and sizes (summary.json)."""
    from slope.train.logs import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    norms = [r["grad_norm"] for r in train
             if isinstance(r.get("grad_norm"), (int, float)) and math.isfinite(r["grad_norm"])]
    curve = [[r["step"], r["loss"]] for r in records if r.get("kind") == "eval" and r.get("set") == "val"]
    best = min(curve, key=lambda point: point[1]) if curve else [None, None]
    # each step's time (logged every step), from its tokens per second and the tokens of one step
    step_tokens = summary["tokens"] / max(1, summary["steps"])
    step_times = [step_tokens / r["tokens_per_s"] for r in train
                  if isinstance(r.get("tokens_per_s"), (int, float)) and r["tokens_per_s"] > 0]
    return {
        "status": "ok",
        "val_loss": summary["eval"]["val"]["loss"],  # the final validation loss: what the LR sweep compares
        "best_val_loss": best[1], "best_val_step": best[0],
        "eval": {name: {k: result[k] for k in ("loss", "ppl", "bpb", "tokens")}
                 for name, result in summary["eval"].items()},
        "val_curve": curve,
        "grad_norm_mean": statistics.fmean(norms) if norms else None,
        "grad_norm_median": statistics.median(norms) if norms else None,
        "grad_norm_max": max(norms) if norms else None,
        # the share of steps whose norm was clipped (0 for an arm without clipping)
        "clip_rate": statistics.fmean(float(r.get("clipped", 0.0)) for r in train) if train else None,
        "final_train_loss": summary["final_train_loss"],
        "steps": summary["steps"], "tokens": summary["tokens"], "parameters": summary["parameters"],
        "train_seconds": summary["train_seconds"], "run_wall_seconds": summary["wall_seconds"],
        # the typical step, for estimates that do not project a pause or a busy spell onto every run left
        "median_step_seconds": statistics.median(step_times) if step_times else None,
        "device": summary["device"], "precision": summary["precision"],
    }


# the `slope train` processes running now, so a study stopped by a signal can end them (with --jobs the
# signal's exception reaches the main thread, not the threads waiting on the processes)
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set while a study is being stopped: a run starting just then ends at once


def _kill_live_runs() -> None:
    with _LIVE_LOCK:
        _STOPPING.set()
        procs = list(_LIVE)
    for proc in procs:
        proc.kill()


def train_run(settings: dict, arm: str, lr: float, seed: int, work: Path, threads: int | None = None,
              device: str | None = None) -> dict:
    """Train one run in `work`, read its results, delete its directory. A divergence (the loss became
    NaN or infinite) is a result, recorded so it is not retried; any other failure stops the study."""
    name = run_name(arm, lr, seed)
    run_dir, log_path = work / name, work / f"{name}.log"
    if run_dir.exists():  # left by a study killed during this run: it had not finished, so start over
        shutil.rmtree(run_dir)
    command = train_command(settings, arm, lr, seed, run_dir, device, threads)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=run_env(threads))
        with _LIVE_LOCK:
            _LIVE.add(proc)
            if _STOPPING.is_set():
                proc.kill()
        try:
            code = proc.wait()
        except BaseException:  # interrupted in this thread (--jobs 1): end the run too
            proc.kill()
            proc.wait()
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    seconds = time.perf_counter() - start
    output = log_path.read_text(errors="replace")
    if code != 0:
        if "the loss became" not in output:
            tail = "\n".join(output.splitlines()[-15:])
            raise StudyError(f"run {name} failed (exit {code}); its log is {log_path}:\n{tail}")
        record = {"status": "diverged", "val_loss": None, "error": output.strip().splitlines()[-1]}
    else:
        record = summarize_run(run_dir)
    record.update(command=[Path(command[0]).name, *command[1:]], wall_seconds=seconds)
    shutil.rmtree(run_dir, ignore_errors=True)
    log_path.unlink(missing_ok=True)
    return record


# ---- the study: the finished runs, the rest run in order, the time left ---------------------------


def load_results(runs_dir: Path, settings: dict) -> dict[tuple[str, float, int], dict]:
    """Finished runs by (arm, lr, seed). A run made with other settings (steps, model, data, extra
    overrides) would not be comparable, so finding one is an error, not a silent mix."""
    results = {}
    for path in sorted(runs_dir.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("settings") != settings:
            raise StudyError(f"{path} was made with other settings ({record.get('settings')}), not {settings}; "
                             "use another --out for a study with different settings")
        results[(record["arm"], record["lr"], record["seed"])] = record
    return results


def _write_record(runs_dir: Path, record: dict) -> None:
    path = runs_dir / f"{run_name(record['arm'], record['lr'], record['seed'])}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # a kill while writing leaves no half-written result


def run_study(arms, lrs, seeds, settings: dict, runs_dir: Path, work: Path,
              runner: Callable[..., dict] = train_run, after_each: Callable[[dict], None] | None = None,
              threads: int | None = None, jobs: int = 1, device: str | None = None) -> dict:
    """Run every pending run, up to `jobs` at a time, writing each one's JSON as soon as it finishes;
    returns all results. `runner(settings, arm, lr, seed, work, threads=threads, device=device)` trains one run. A run
    that fails stops the study once the runs in progress have finished (and been saved)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = load_results(runs_dir, settings)
    _STOPPING.clear()
    running: dict = {}  # future -> (arm, lr, seed), in start order
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        try:
            while True:
                if error is None:
                    for key in pending(arms, lrs, seeds, results):
                        if len(running) >= max(1, jobs):
                            break
                        if key in running.values():
                            continue
                        others = f", {len(running)} other(s) running" if running else ""
                        print(f"[{run_name(*key)}] starting; {remaining(arms, lrs, seeds, results)} run(s) left"
                              f"{others}", flush=True)
                        running[pool.submit(runner, settings, *key, work, threads=threads, device=device)] = key
                if not running:
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in [f for f in running if f in done]:
                    arm, lr, seed = running.pop(future)
                    try:
                        outcome = future.result()
                    except BaseException as exc:  # raised once the runs in progress are saved
                        error = error or exc
                        continue
                    record = {"arm": arm, "method": ARMS[arm][0], "lr": lr, "seed": seed, "settings": settings,
                              "threads": threads, "jobs": jobs, **outcome}
                    _write_record(runs_dir, record)
                    results[(arm, lr, seed)] = record
                    val = "diverged" if record["status"] != "ok" else f"val loss {record['val_loss']:.4f}"
                    print(f"[{run_name(arm, lr, seed)}] done in {record['wall_seconds']:.0f} s: {val}", flush=True)
                    if after_each:
                        after_each(results)
        except BaseException:  # a signal or Ctrl-C in this thread: end the runs in progress too
            _kill_live_runs()
            raise
    if error is not None:
        raise error
    return results


def typical_seconds(record: dict) -> float | None:
    """A finished run's time at its median step: its steps at the median step time plus what it spent
    outside the training loop, so a pause (a suspended study, a busy machine) is not projected onto the runs
    left; its wall time for a run recorded without step times."""
    step = record.get("median_step_seconds")
    if step and record.get("steps") and record.get("run_wall_seconds") and record.get("train_seconds"):
        return record["steps"] * step + record["run_wall_seconds"] - record["train_seconds"]
    return record.get("wall_seconds")


def estimate(arms, lrs, seeds, results: dict, jobs: int = 1) -> tuple[int, float | None]:
    """(runs left, seconds they should take: the median typical_seconds of the finished runs x runs / jobs,
    or None before any run has finished). Runs with step times count alone once there are any: the wall
    time of a run recorded without them may hold a pause."""
    left = remaining(arms, lrs, seeds, results)
    timed = [r for r in results.values() if r.get("median_step_seconds")] or list(results.values())
    times = [t for r in timed if (t := typical_seconds(r))]
    return left, (left * statistics.median(times) / max(1, jobs) if times else None)


def projected_seconds(scale: str, left: int, jobs: int, runs_8m: Path) -> tuple[float, float] | None:
    """(seconds, FLOP ratio) for the runs left of a scale with no finished run: the 8m runs' median
    typical_seconds x the scale's training FLOPs per token over 8m's; None without 8m runs or a shape."""
    if scale == "8m" or scale not in SHAPES or not runs_8m.is_dir():
        return None
    times = []
    for path in runs_8m.glob("*.json"):
        record = json.loads(path.read_text())
        if record.get("status") == "ok" and record.get("settings", {}).get("scale") == "8m":
            times.append(typical_seconds(record))
    times = [t for t in times if t]
    if not times:
        return None
    ratio = train_flops_per_token(*SHAPES[scale]) / train_flops_per_token(*SHAPES["8m"])
    return left * statistics.median(times) * ratio / max(1, jobs), ratio


# ---- command line ----------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--scale", choices=[s for s in SCALES if s != "quick"], default="8m")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, dense and slope, 1 LR, 2 seeds, 4 steps; outputs under --work")
    parser.add_argument("--arms", help=f"comma-separated subset of the arms {', '.join(ARMS)} and the slots "
                        f"{', '.join(SLOTS)}")
    parser.add_argument("--lrs", type=_floats, help="comma-separated LR grid (default: the scale's)")
    parser.add_argument("--seeds", type=_ints, help="comma-separated seeds; the first one runs the LR sweep")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the scale's)")
    parser.add_argument("--train-data", help="the training corpus (default: shakespeare; required for gpt2-small)")
    parser.add_argument("--out", type=Path, help="per-run results (default benchmarks/results/accuracy/<scale>)")
    parser.add_argument("--work", type=Path, default=Path("/tmp"),
                        help="scratch space for run directories, deleted run by run (default /tmp)")
    parser.add_argument("--report-dir", type=Path, help="where accuracy_<scale>.{json,md,png} go "
                        "(default benchmarks/results)")
    parser.add_argument("--threads", type=_positive, help="OMP_NUM_THREADS and MKL_NUM_THREADS of every run "
                        "(default: $OMP_NUM_THREADS if set, else torch's default); recorded in each run's JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where every run trains (default: cpu for 8m and 30m, cuda for gpt2-small, slope's "
                        "choice for --quick); 8m and 30m train in float32 on either, so runs from both devices "
                        "belong to one study")
    parser.add_argument("--jobs", type=_positive, default=1,
                        help="runs trained at once, in dependency order (default 1)")
    parser.add_argument("--estimate", action="store_true", help="print the plan, the runs left and their time; run nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs, run nothing")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run after `--`, e.g. -- --run.compile=false")
    args = parser.parse_args(argv)
    # `timeout` and job schedulers stop a study with SIGTERM: turned into an exception, it makes the study
    # kill the runs in progress too, instead of leaving them training as orphans
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    scale_name = "quick" if args.quick else args.scale
    scale = SCALES[scale_name]
    arms = tuple(a.strip() for a in args.arms.split(",")) if args.arms else scale.arms
    if problem := check_arms(arms):
        parser.error(problem)
    lrs, seeds = args.lrs or scale.lrs, args.seeds or scale.seeds
    steps = args.steps or scale.steps
    train_data = args.train_data or scale.train_data
    if train_data is None:
        parser.error(f"--scale {scale_name} needs --train-data: a corpus large enough for its token budget")
    threads = args.threads or default_threads()
    work = args.work / f"slope-accuracy-{scale_name}"
    # a smoke test's outputs are not results: they stay in the scratch space
    out = args.out or (work / "study" if args.quick else _report.RESULTS / "accuracy" / scale_name)
    report_dir = args.report_dir or (out if args.quick else _report.RESULTS)
    settings = {
        "scale": scale_name, "config": scale.config, "model": list(scale.model), "steps": steps,
        "train_data": train_data, "eval_every": max(1, steps // 16), "extra": list(args.extra),
        # the GPT-2 config warms up over 700 of its 19,000 steps; a shorter study keeps the same share
        "warmup": [f"--optim.warmup_steps={max(1, round(steps * 700 / 19000))}"] if scale_name == "gpt2-small" else [],
    }
    if scale_name == "30m":
        print(f"30m model: hidden 512, 8 layers, 8 heads, MLP 1376, vocabulary 8192 (tied): "
              f"{llama_parameters(512, 8, 1376):,} parameters")

    runs_dir = out / "runs"
    try:
        results = load_results(runs_dir, settings) if runs_dir.is_dir() else {}
    except StudyError as err:
        sys.exit(f"accuracy: error: {err}")
    left, seconds = estimate(arms, lrs, seeds, results, args.jobs)
    total, extended = planned(arms, lrs, seeds), beyond_grid(arms, lrs, seeds, results)
    projected = projected_seconds(scale_name, left, args.jobs, _report.RESULTS / "accuracy" / "8m" / "runs")
    if seconds is not None:
        when = f"about {_hours(seconds)} at the finished runs' typical step time, {args.jobs} at a time"
    elif projected is not None:
        when = (f"about {_hours(projected[0])}, {args.jobs} at a time, projected from the 8m runs' typical time x "
                f"{projected[1]:.2f}, the ratio of training FLOPs per token (a CPU runs matrices of the two sizes "
                "at different efficiency: a rough guide until one run has finished)")
    else:
        when = "time unknown until one run has finished"
    beyond = f" + {extended} beyond the LR grid's edge" if extended else ""
    print(f"accuracy study {scale_name}: {total} runs planned ({breakdown(arms, lrs, seeds)}){beyond}, "
          f"{finished(arms, lrs, seeds, results)} finished, "
          f"{left} left ({when}); {threads} thread(s) a run; results in {runs_dir}. Interrupt at any time: "
          "the same command continues where it stopped.", flush=True)
    if args.estimate:
        print(plan_table(arms, lrs, seeds, results))
        if contest := contest_text(arms, lrs, seeds, results):
            print(contest)
        return
    if not args.report_only and args.jobs * threads > (os.cpu_count() or 1):
        print(f"note: {args.jobs} job(s) x {threads} thread(s) is more than the {os.cpu_count()} CPU(s) here",
              flush=True)
    try:
        if not args.report_only:
            def progress(results: dict) -> None:
                write_report(scale_name, arms, lrs, seeds, settings, results, runs_dir, report_dir)
                left, seconds = estimate(arms, lrs, seeds, results, args.jobs)
                if left:
                    print(f"{left} run(s) left, about {_hours(seconds)}", flush=True)

            results = run_study(arms, lrs, seeds, settings, runs_dir, work, after_each=progress,
                                threads=threads, jobs=args.jobs, device=args.device or scale.device)
        path = write_report(scale_name, arms, lrs, seeds, settings, results, runs_dir, report_dir)
    except StudyError as err:
        sys.exit(f"accuracy: error: {err}")
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
