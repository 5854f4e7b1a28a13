"""A fair quality study: dense, SLoPe 2:4 and their controls, each LR-swept and over several seeds.

    python benchmarks/accuracy.py --scale 8m                   # 8.4M parameters (the default run's model)
    python benchmarks/accuracy.py --scale 30m                  # ~29.5M parameters
    python benchmarks/accuracy.py --scale gpt2-small --train-data CORPUS   # GPT-2 small, on a GPU
    python benchmarks/accuracy.py --scale 8m --estimate        # runs left and the time they should take
    python benchmarks/accuracy.py --scale 8m --report-only     # rewrite the report from the finished runs
    python benchmarks/accuracy.py --quick                      # smoke test: tiny model, about a minute

The rules, so that no arm is favoured:
- every arm trains on the same number of tokens (same steps, batch and sequence length);
- each arm gets its own learning rate: a sweep (seed 0) picks the LR with the lowest final validation
  loss, where validation is the held-out last 5 % of the TRAINING corpus (`--data.val=`), never a set
  that is reported; the other seeds then run at that LR (seed 0 is reused from the sweep);
- the reported sets, Shakespeare's held-out works and Milton, are evaluated once, at the end of each run,
  and only summarised (mean ± std over seeds), never used to choose anything.

The study is resumable and meant to span several sessions (the 8m study is many hours on 2 CPU cores):
every finished run leaves one small JSON under --out/runs/, a rerun of the same command skips those, and
each run directory (checkpoints, tokens) lives in --work and is deleted once its JSON is written, so a
killed study loses at most the run in progress. The report (benchmarks/results/accuracy_<scale>.{json,md,png})
is rewritten after every run from whatever has finished, naming the runs still missing. Run one study per
--out at a time (two processes on the same --out would train the same runs).

Time, measured on 2 shared CPU cores (load about 5) with 40-step 8m runs: 453 s dense, 371 s SLoPe, of
which about 180 s was start-up, tokenizer training and evaluation and the rest 4.6-6.8 s a step. On an
idle machine an 8m step takes about 1 s (docs/training.md), so an 800-step run is about 15 minutes and
the 40 runs of the 8m study about 10 hours; a 30m step is about 3.5x the compute (about 32 hours).
`--estimate` projects from the runs already finished on the machine at hand.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report

# arm -> (slope train --method, the overrides that make the arm). The srste and wanda values are their
# defaults, written out so each run's record says what it ran with.
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dense": ("dense", ()),
    # Init-scale controls. sqrt(n/m) = 0.7071 is the output scale of dropping half the weights at random;
    # a 2:4 magnitude prune keeps about 87 % of a Gaussian layer's weight energy, an output scale of
    # about 0.93 (docs/methods.md), so both bracket where SLoPe's pruned layers start.
    "dense-init0.71": ("dense", ("--model.linear_init_scale=0.7071",)),
    "dense-init0.93": ("dense", ("--model.linear_init_scale=0.93",)),
    "dense-noclip": ("dense", ("--optim.grad_clip=0",)),  # does gradient clipping favour one arm?
    "slope": ("slope", ()),  # adapters for the last 1 % of steps (the default)
    "slope-adapters0.9": ("slope", ("--slope.adapter_start=0.9",)),
    "slope-nodp": ("slope", ("--slope.double_prune=false",)),
    "srste": ("srste", ("--method.srste_decay=2e-4",)),
    "wanda": ("wanda", ("--method.wanda_dense_fraction=0.5",)),
}
TEST_SETS = ("shakespeare-heldout", "milton")
VAL_FRACTION = 0.05


@dataclass(frozen=True)
class Scale:
    config: str | None  # a shipped config for `slope train --config`; None = the built-in default run
    model: tuple[str, ...]  # overrides that size the model
    steps: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    train_data: str | None  # None: --train-data must be given


_MODEL_30M = ("--model.hidden_size=512", "--model.num_layers=8", "--model.num_heads=8",
              "--model.intermediate_size=1376")
SCALES = {
    # 800 steps x 8 x 256 = 1.64M tokens, about 1.2 epochs of the 1.32M training tokens
    "8m": Scale(None, (), 800, (1e-3, 2e-3, 4e-3), (0, 1, 2), tuple(ARMS), "shakespeare"),
    "30m": Scale(None, _MODEL_30M, 800, (1e-3, 2e-3, 4e-3), (0, 1, 2), tuple(ARMS), "shakespeare"),
    # 131,072 tokens a step: 2,000 steps are 262M tokens, so it needs a real corpus (--train-data)
    "gpt2-small": Scale("gpu-gpt2-small", (), 2000, (3e-4, 6e-4, 1.2e-3), (0, 1), tuple(ARMS), None),
    "quick": Scale("tiny", (), 4, (1e-2,), (0, 1), ("dense", "slope"), "shakespeare"),
}


def llama_parameters(hidden: int, layers: int, intermediate: int, vocab: int = 8192) -> int:
    """Parameters of the llama preset with tied embeddings: embeddings, per block 4 attention and 3 MLP
    matrices and 2 norms, and the final norm."""
    return vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}-lr{lr:g}-seed{seed}"


# ---- one run ----------------------------------------------------------------------------------------


class StudyError(RuntimeError):
    """A run failed for a reason other than divergence (a bad override, a crash): the study stops."""


def train_command(settings: dict, arm: str, lr: float, seed: int, run_dir: Path) -> list[str]:
    """The `slope train` command of one run: the scale's settings, then the arm's overrides, then --extra."""
    method, arm_overrides = ARMS[arm]
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
        *settings["model"], *settings["warmup"], *arm_overrides, *settings["extra"],
    ]
    return command


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
        "device": summary["device"], "precision": summary["precision"],
    }


def train_run(settings: dict, arm: str, lr: float, seed: int, work: Path) -> dict:
    """Train one run in `work`, read its results, delete its directory. A divergence (the loss became
    NaN or infinite) is a result, recorded so it is not retried; any other failure stops the study."""
    name = run_name(arm, lr, seed)
    run_dir, log_path = work / name, work / f"{name}.log"
    if run_dir.exists():  # left by a study killed during this run: it had not finished, so start over
        shutil.rmtree(run_dir)
    command = train_command(settings, arm, lr, seed, run_dir)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
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


# ---- the study: which runs, in which order -------------------------------------------------------


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


def choose_lr(arm: str, lrs: tuple[float, ...], sweep_seed: int, results: dict) -> float | None:
    """The LR of the arm's sweep with the lowest final VALIDATION loss (the test sets play no part);
    None until every LR of the sweep has finished, or when all of them diverged."""
    sweep = [results.get((arm, lr, sweep_seed)) for lr in lrs]
    if any(r is None for r in sweep):
        return None
    losses = {lr: r["val_loss"] for lr, r in zip(lrs, sweep, strict=True) if r["status"] == "ok"}
    return min(losses, key=losses.get) if losses else None


def pending(arms, lrs, seeds, results: dict) -> list[tuple[str, float, int]]:
    """The runs that can start now, in order: every arm's sweep first, then seed by seed across the arms,
    so a study stopped early still has every arm at the same number of seeds (give or take one)."""
    todo = [(arm, lr, seeds[0]) for arm in arms for lr in lrs if (arm, lr, seeds[0]) not in results]
    for seed in seeds[1:]:
        for arm in arms:
            lr = choose_lr(arm, lrs, seeds[0], results)
            if lr is not None and (arm, lr, seed) not in results:
                todo.append((arm, lr, seed))
    return todo


def remaining(arms, lrs, seeds, results: dict) -> int:
    """Runs still to do, counting the seeds of arms whose LR is not chosen yet."""
    count = 0
    for arm in arms:
        count += sum((arm, lr, seeds[0]) not in results for lr in lrs)
        lr = choose_lr(arm, lrs, seeds[0], results)
        if lr is None and all((arm, x, seeds[0]) in results for x in lrs):
            continue  # every LR diverged: no seed runs will follow
        count += sum(lr is None or (arm, lr, seed) not in results for seed in seeds[1:])
    return count


def run_study(arms, lrs, seeds, settings: dict, runs_dir: Path, work: Path,
              runner: Callable[..., dict] = train_run, after_each: Callable[[dict], None] | None = None) -> dict:
    """Run every pending run, writing each one's JSON as soon as it finishes; returns all results."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results = load_results(runs_dir, settings)
    while todo := pending(arms, lrs, seeds, results):
        arm, lr, seed = todo[0]
        print(f"[{run_name(arm, lr, seed)}] starting; {remaining(arms, lrs, seeds, results)} run(s) left",
              flush=True)
        record = {"arm": arm, "method": ARMS[arm][0], "lr": lr, "seed": seed, "settings": settings,
                  **runner(settings, arm, lr, seed, work)}
        path = runs_dir / f"{run_name(arm, lr, seed)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(path)  # a kill while writing leaves no half-written result
        results[(arm, lr, seed)] = record
        val = "diverged" if record["status"] != "ok" else f"val loss {record['val_loss']:.4f}"
        print(f"[{run_name(arm, lr, seed)}] done in {record['wall_seconds']:.0f} s: {val}", flush=True)
        if after_each:
            after_each(results)
    return results


def estimate(arms, lrs, seeds, results: dict) -> tuple[int, float | None]:
    """(runs left, seconds they should take from the median wall time of the finished runs, or None)."""
    left = remaining(arms, lrs, seeds, results)
    walls = [r["wall_seconds"] for r in results.values() if r.get("wall_seconds")]
    return left, (left * statistics.median(walls) if walls else None)


# ---- the report ------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict | None:
    """mean, sample std (n - 1; None for one value), min, max and n; None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(arms, lrs, seeds, results: dict) -> list[dict]:
    """One row per arm: the sweep, the chosen LR and the seeds' statistics at it, and what is missing."""
    rows = []
    for arm in arms:
        lr = choose_lr(arm, lrs, seeds[0], results)
        sweep = {}
        for x in lrs:
            r = results.get((arm, x, seeds[0]))
            sweep[f"{x:g}"] = None if r is None else (r["val_loss"] if r["status"] == "ok" else "diverged")
        runs = {s: results.get((arm, lr, s)) for s in seeds} if lr is not None else {}
        done = {s: r for s, r in runs.items() if r is not None and r["status"] == "ok"}
        row = {
            "arm": arm, "method": ARMS[arm][0], "overrides": list(ARMS[arm][1]), "lr": lr,
            "lr_at_edge": lr is not None and len(lrs) > 1 and lr in (min(lrs), max(lrs)),
            "sweep_val_loss": sweep,
            "seeds_done": sorted(done),
            "seeds_diverged": sorted(s for s, r in runs.items() if r is not None and r["status"] != "ok"),
            "seeds_missing": [s for s in seeds if runs.get(s) is None],
            "missing_runs": [run_name(arm, x, seeds[0]) for x in lrs if sweep[f"{x:g}"] is None]
            + ([run_name(arm, lr, s) for s in seeds if runs.get(s) is None] if lr is not None
               else [f"{arm} seed {s} (after the sweep)" for s in seeds[1:]]),
        }
        for name in TEST_SETS:
            for key in ("ppl", "bpb"):
                row[f"{name}_{key}"] = stats([r["eval"][name][key] for r in done.values()])
        row["val_loss"] = stats([r["val_loss"] for r in done.values()])
        row["best_val_loss"] = stats([r["best_val_loss"] for r in done.values()])
        row["grad_norm_mean"] = stats([r["grad_norm_mean"] for r in done.values() if r["grad_norm_mean"] is not None])
        row["clip_rate"] = stats([r["clip_rate"] for r in done.values() if r["clip_rate"] is not None])
        rows.append(row)
    dense = next((row for row in rows if row["arm"] == "dense"), None)
    for row in rows:
        for name in TEST_SETS:
            reference = dense[f"{name}_bpb"] if dense is not None and row is not dense else None
            row[f"{name}_bpb_vs_dense"] = difference(row[f"{name}_bpb"], reference)
    return rows


def difference(a: dict | None, b: dict | None) -> dict | None:
    """a's mean minus b's, with the standard error of that difference from the seed spreads
    (sqrt(std_a^2/n_a + std_b^2/n_b); None when either arm has fewer than 2 seeds)."""
    if not a or not b:
        return None
    se = None
    if a["std"] is not None and b["std"] is not None:
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"diff": a["mean"] - b["mean"], "se": se}


def _fmt(s: dict | None, digits: int) -> str:
    if not s:
        return "—"
    std = f" ± {s['std']:.{digits}f}" if s["std"] is not None else ""
    return f"{s['mean']:.{digits}f}{std} (n={s['n']})"


def _fmt_diff(d: dict | None) -> str:
    if not d:
        return "—"
    return f"{d['diff']:+.4f}" + (f" ± {d['se']:.4f}" if d["se"] is not None else "")


def tables(rows: list[dict]) -> str:
    quality = [
        "| arm | LR | seeds | Shakespeare held-out ppl | Shakespeare bpb | Milton ppl | Milton bpb "
        "| Δ Shakespeare bpb vs dense | Δ Milton bpb vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds = len(row["seeds_done"]) + len(row["seeds_missing"]) + len(row["seeds_diverged"])
        lr = "—" if row["lr"] is None else f"{row['lr']:g}" + (" (edge)" if row["lr_at_edge"] else "")
        quality.append(
            f"| {row['arm']} | {lr} | {len(row['seeds_done'])}/{seeds} "
            f"| {_fmt(row['shakespeare-heldout_ppl'], 2)} | {_fmt(row['shakespeare-heldout_bpb'], 4)} "
            f"| {_fmt(row['milton_ppl'], 2)} | {_fmt(row['milton_bpb'], 4)} "
            f"| {_fmt_diff(row['shakespeare-heldout_bpb_vs_dense'])} | {_fmt_diff(row['milton_bpb_vs_dense'])} |")
    training = [
        "| arm | validation loss per LR (seed 0; chosen in bold) | final val loss | best val loss "
        "| mean grad norm | clip rate | missing runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for lr, loss in row["sweep_val_loss"].items():
            text = "missing" if loss is None else loss if isinstance(loss, str) else f"{loss:.4f}"
            cells.append(f"**{lr}: {text}**" if row["lr"] is not None and lr == f"{row['lr']:g}" else f"{lr}: {text}")
        missing = ", ".join(row["missing_runs"]) or "none"
        if row["seeds_diverged"]:
            missing += f"; diverged seeds: {row['seeds_diverged']}"
        training.append(f"| {row['arm']} | {'; '.join(cells)} | {_fmt(row['val_loss'], 4)} "
                        f"| {_fmt(row['best_val_loss'], 4)} | {_fmt(row['grad_norm_mean'], 3)} "
                        f"| {_fmt(row['clip_rate'], 3)} | {missing} |")
    return "\n".join(["## Held-out quality (mean ± std over seeds, at each arm's chosen LR)", "", *quality, "",
                      "## LR sweep and training", "", *training])


def plot(rows: list[dict], results: dict, path: Path, scale: str) -> bool:
    """Every arm's validation-loss curve at its chosen LR: the mean over seeds and the min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for row in rows:
        curves = [dict(map(tuple, results[(row["arm"], row["lr"], s)]["val_curve"])) for s in row["seeds_done"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[step] for c in curves] for step in steps]
        line, = ax.plot(steps, [statistics.fmean(v) for v in values], label=f"{row['arm']} (lr {row['lr']:g}, "
                        f"{len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (held-out 5 % of the training corpus)")
        ax.set_title(f"accuracy study {scale}: validation loss, mean over seeds, band = min–max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_report(scale: str, arms, lrs, seeds, settings: dict, results: dict, runs_dir: Path, report_dir: Path) -> Path:
    rows = aggregate(arms, lrs, seeds, results)
    name = f"accuracy_{scale}"
    report_dir.mkdir(parents=True, exist_ok=True)
    has_plot = plot(rows, results, report_dir / f"{name}.png", scale)
    planned = len(arms) * (len(lrs) + len(seeds) - 1)
    left = remaining(arms, lrs, seeds, results)
    finished = [r for r in results.values() if r["arm"] in arms and r.get("status") == "ok"]
    metrics = {"runs_planned": planned, "runs_left": left,
               "steps_per_run": settings["steps"],
               "tokens_per_run": finished[0]["tokens"] if finished else None,
               "parameters": finished[0]["parameters"]["dense_equivalent"] if finished else None}
    slope_row = next((r for r in rows if r["arm"] == "slope"), None)
    for set_name in TEST_SETS:
        d = slope_row and slope_row[f"{set_name}_bpb_vs_dense"]
        metrics[f"{set_name}_bpb_slope_minus_dense"] = d["diff"] if d else None
        metrics[f"{set_name}_bpb_slope_minus_dense_se"] = d["se"] if d else None
    status = ("complete" if left == 0 else
              f"PARTIAL: {left} of {planned} runs still missing (listed per arm in the table above); rerun the same command to continue")
    notes = "\n\n".join([
        f"Study status: {status}.",
        f"Scale `{scale}`: `slope train{' --config ' + settings['config'] if settings['config'] else ''}` with "
        f"{' '.join(settings['model']) or 'its default model'}, {settings['steps']} steps for every arm "
        f"(the same tokens for all), trained on `{settings['train_data']}`. LR grid {', '.join(f'{x:g}' for x in lrs)} "
        f"at seed {seeds[0]}; seeds {', '.join(map(str, seeds))} at the chosen LR.",
        "The LR is chosen by the final loss on the held-out last 5 % of the training corpus (`--data.val=`, "
        f"`--data.val_fraction={VAL_FRACTION}`); the reported sets (Shakespeare's held-out works, Milton) are evaluated "
        "once at the end of each run and never used to choose anything. \"(edge)\": the chosen LR is the smallest "
        "or largest of the grid, so a wider grid might do better.",
        "Std is the sample standard deviation over seeds (n − 1). Δ vs dense: the arm's mean minus dense's, ± the "
        "standard error of that difference from the two seed spreads; a Δ within about two standard errors is "
        "not a difference the seeds can tell apart. Grad norms are before clipping, over every step; the clip rate is "
        "the share of steps clipped (at optim.grad_clip = 1.0, except dense-noclip).",
        "Per-run results (including each run's exact `slope train` command): "
        f"`{_report._repo_relative(str(runs_dir))}/`." + (f" Plot: `{name}.png`." if has_plot else ""),
    ])
    path = _report.write(name, metrics, rows, tables(rows), notes, out_dir=report_dir)
    return path


# ---- command line ----------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


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
    parser.add_argument("--arms", help=f"comma-separated subset of: {', '.join(ARMS)}")
    parser.add_argument("--lrs", type=_floats, help="comma-separated LR grid (default: the scale's)")
    parser.add_argument("--seeds", type=_ints, help="comma-separated seeds; the first one runs the LR sweep")
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the scale's)")
    parser.add_argument("--train-data", help="the training corpus (default: shakespeare; required for gpt2-small)")
    parser.add_argument("--out", type=Path, help="per-run results (default benchmarks/results/accuracy/<scale>)")
    parser.add_argument("--work", type=Path, default=Path("/tmp"),
                        help="scratch space for run directories, deleted run by run (default /tmp)")
    parser.add_argument("--report-dir", type=Path, help="where accuracy_<scale>.{json,md,png} go "
                        "(default benchmarks/results)")
    parser.add_argument("--estimate", action="store_true", help="print the runs left and their time, run nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs, run nothing")
    parser.add_argument("extra", nargs="*", help="overrides passed to every run after `--`, e.g. -- --run.compile=false")
    args = parser.parse_args(argv)
    # `timeout` and job schedulers stop a study with SIGTERM: turned into an exception, it makes
    # subprocess.run kill the run in progress too, instead of leaving it training as an orphan
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    scale_name = "quick" if args.quick else args.scale
    scale = SCALES[scale_name]
    arms = tuple(a.strip() for a in args.arms.split(",")) if args.arms else scale.arms
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; arms are {', '.join(ARMS)}")
    lrs, seeds = args.lrs or scale.lrs, args.seeds or scale.seeds
    steps = args.steps or scale.steps
    train_data = args.train_data or scale.train_data
    if train_data is None:
        parser.error(f"--scale {scale_name} needs --train-data: a corpus large enough for its token budget")
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
    results = load_results(runs_dir, settings) if runs_dir.is_dir() else {}
    left, seconds = estimate(arms, lrs, seeds, results)
    planned = len(arms) * (len(lrs) + len(seeds) - 1)
    when = f"about {_hours(seconds)} at the median of the finished runs" if seconds is not None else \
        "time unknown until one run has finished"
    print(f"accuracy study {scale_name}: {planned - left} of {planned} runs finished, {left} left ({when}); "
          f"results in {runs_dir}. Interrupt at any time: the same command continues where it stopped.", flush=True)
    if args.estimate:
        return
    try:
        if not args.report_only:
            def progress(results: dict) -> None:
                write_report(scale_name, arms, lrs, seeds, settings, results, runs_dir, report_dir)
                left, seconds = estimate(arms, lrs, seeds, results)
                if left:
                    print(f"{left} run(s) left, about {_hours(seconds)}", flush=True)

            results = run_study(arms, lrs, seeds, settings, runs_dir, work, after_each=progress)
        path = write_report(scale_name, arms, lrs, seeds, settings, results, runs_dir, report_dir)
    except StudyError as err:
        sys.exit(f"accuracy: error: {err}")
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
