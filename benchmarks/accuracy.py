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
| dense | grid | the dense model at its default init |
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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report

# arm -> (slope train --method, the overrides that make the arm). The srste and wanda values are their
# defaults, written out so each run's record says what it ran with. "{half_layers}" is half the scale's blocks.
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dense": ("dense", ()),
    # Init-scale controls. sqrt(n/m) = 0.7071 is the output scale of dropping half the weights at random;
    # a 2:4 magnitude prune keeps about 87 % of a Gaussian layer's weight energy, an output scale of
    # about 0.93 (docs/methods.md), so both bracket where SLoPe's pruned layers start.
    "dense-init0.71": ("dense", ("--model.linear_init_scale=0.7071",)),
    "dense-init0.93": ("dense", ("--model.linear_init_scale=0.93",)),
    "dense-noclip": ("dense", ("--optim.grad_clip=0",)),  # does gradient clipping favour one arm?
    # the paper's GPT2-Half: half the blocks, about the non-zero weights of the 2:4 model, at the fair init
    "dense-half": ("dense", ("--model.num_layers={half_layers}", "--model.linear_init_scale=0.7071")),
    "slope": ("slope", ()),  # adapters for the last 1 % of steps (the default)
    "slope-init0.71": ("slope", ("--model.linear_init_scale=0.7071",)),
    "slope-adapters0.9": ("slope", ("--slope.adapter_start=0.9",)),
    "slope-init0.71-adapters0.9": ("slope", ("--model.linear_init_scale=0.7071", "--slope.adapter_start=0.9")),
    "slope-nodp": ("slope", ("--slope.double_prune=false",)),
    "srste": ("srste", ("--method.srste_decay=2e-4",)),
    "srste-init0.71": ("srste", ("--method.srste_decay=2e-4", "--model.linear_init_scale=0.7071")),
    "wanda": ("wanda", ("--method.wanda_dense_fraction=0.5",)),
    "wanda-init0.71": ("wanda", ("--method.wanda_dense_fraction=0.5", "--model.linear_init_scale=0.7071")),
}
# follower -> the family head whose seed-0 sweep picks its two LRs (the head's best and one neighbour).
# A follower only follows when its head is part of the study; listed alone it sweeps the whole grid.
FOLLOWS: dict[str, str] = {
    "dense-half": "dense-init0.71",
    "slope-adapters0.9": "slope", "slope-init0.71-adapters0.9": "slope-init0.71",
    "srste": "slope", "srste-init0.71": "slope-init0.71",
    "wanda": "slope", "wanda-init0.71": "slope-init0.71",
}
# Conditional slots: once the SLoPe init contest (the keys, each a head) is decided by validation loss at
# each one's chosen LR, the slot runs the arm of the winner.
SLOTS: dict[str, dict[str, str]] = {
    "adapters0.9@winning-init": {"slope": "slope-adapters0.9", "slope-init0.71": "slope-init0.71-adapters0.9"},
    "srste@winning-init": {"slope": "srste", "slope-init0.71": "srste-init0.71"},
    "wanda@winning-init": {"slope": "wanda", "slope-init0.71": "wanda-init0.71"},
}
STUDY = ("dense", "dense-init0.71", "slope", "slope-init0.71", "dense-half",
         "adapters0.9@winning-init", "srste@winning-init", "wanda@winning-init")
FAIR_DENSE, DENSE_HALF = "dense-init0.71", "dense-half"  # the two references of every Δ
BEYOND_GRID = 2  # LRs an arm's sweep may add past the grid's edge while its best sits there (extend_sweep)
# Earlier hand-run 8m results the study's own runs must reproduce, to the digits given:
# (arm, lr, seed, final val loss, held-out Shakespeare ppl, Milton ppl)
REPRODUCTION = (
    ("slope", 2e-3, 0, "4.854", "134.4", "714"),
    ("slope-init0.71", 2e-3, 0, "4.813", "128.9", "697"),
)
TEST_SETS = ("shakespeare-heldout", "milton")
VAL_FRACTION = 0.05


@dataclass(frozen=True)
class Scale:
    config: str | None  # a shipped config for `slope train --config`; None = the built-in default run
    model: tuple[str, ...]  # overrides that size the model
    steps: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    arms: tuple[str, ...]  # arms and conditional slots
    train_data: str | None  # None: --train-data must be given
    layers: int  # the model's blocks (dense-half trains half of them)
    device: str | None = "cpu"  # where its runs train unless --device says otherwise (None: slope's choice)
    # --run.precision of every run; "fp32" keeps a CPU scale's runs comparable wherever they train (a GPU
    # would otherwise pick bf16); None: the scale's config decides
    precision: str | None = "fp32"


_MODEL_30M = ("--model.hidden_size=512", "--model.num_layers=8", "--model.num_heads=8",
              "--model.intermediate_size=1376")
SCALES = {
    # 800 steps x 8 x 256 = 1.64M tokens, about 1.2 epochs of the 1.32M training tokens
    "8m": Scale(None, (), 800, (1e-3, 2e-3, 4e-3), (0, 1, 2), STUDY, "shakespeare", 8),
    "30m": Scale(None, _MODEL_30M, 800, (1e-3, 2e-3, 4e-3), (0, 1, 2), STUDY, "shakespeare", 8),
    # 131,072 tokens a step: 2,000 steps are 262M tokens, so it needs a real corpus (--train-data)
    "gpt2-small": Scale("gpu-gpt2-small", (), 2000, (3e-4, 6e-4, 1.2e-3), (0, 1), STUDY, None, 12, "cuda", None),
    "quick": Scale("tiny", (), 4, (1e-2,), (0, 1), ("dense", "slope"), "shakespeare", 2, None),  # slope's device
}


def llama_parameters(hidden: int, layers: int, intermediate: int, vocab: int = 8192) -> int:
    """Parameters of the llama preset with tied embeddings: embeddings, per block 4 attention and 3 MLP
    matrices and 2 norms, and the final norm."""
    return vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden) + hidden


# (hidden, layers, MLP width) of the CPU scales' models: a scale with no finished run yet projects its time
# from the 8m runs by the ratio of their training FLOPs per token
SHAPES = {"8m": (256, 8, 688), "30m": (512, 8, 1376)}


def train_flops_per_token(hidden: int, layers: int, intermediate: int, seq_len: int = 256,
                          vocab: int = 8192) -> int:
    """Training FLOPs per token: 6 per weight of every matrix product (2 forward, 4 backward), the tied
    output head included, plus attention's scores and weighted sum, 12 x layers x seq_len x hidden (forward
    and backward, no causal discount). Norms, the optimizer and the mask are left out: small at these sizes."""
    matmul_weights = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + vocab * hidden
    return 6 * matmul_weights + 12 * layers * seq_len * hidden


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}-lr{lr:g}-seed{seed}"


# ---- one run ----------------------------------------------------------------------------------------


class StudyError(RuntimeError):
    """A run failed for a reason other than divergence (a bad override, a crash): the study stops."""


def arm_overrides(arm: str, settings: dict | None = None) -> tuple[str, ...]:
    """The arm's overrides, with "{half_layers}" filled in from the scale's block count."""
    overrides = ARMS[arm][1]
    if settings is None or not any("{half_layers}" in o for o in overrides):
        return overrides
    scale = SCALES.get(settings["scale"])
    if scale is None:
        raise StudyError(f"arm {arm} needs the model's block count; scale {settings['scale']!r} is not one of "
                         f"{', '.join(SCALES)}")
    return tuple(o.replace("{half_layers}", str(max(1, scale.layers // 2))) for o in overrides)


def train_command(settings: dict, arm: str, lr: float, seed: int, run_dir: Path, device: str | None = None) -> list[str]:
    """The `slope train` command of one run: the scale's settings, then the arm's overrides, then --extra.
    `device` (cpu or cuda; None: slope's choice) and the scale's precision are not settings: runs of one
    study on a CPU and on a GPU at the same precision differ only in the order of float sums."""
    method = ARMS[arm][0]
    scale = SCALES.get(settings["scale"])
    placement = [f"--run.device={device}"] if device else []
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
    command = train_command(settings, arm, lr, seed, run_dir, device)
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


def extend_sweep(arm: str, base: tuple[float, ...], grid: tuple[float, ...], sweep_seed: int,
                 results: dict) -> tuple[float, ...]:
    """The arm's seed-0 LRs: `base`, and while the best of them (by validation loss) is the grid's smallest LR
    or one below it (the largest, or above), the LR half (twice) as large, up to BEYOND_GRID points outside the
    grid. A best LR at the grid's edge says the optimum may lie beyond it; a baseline left there would be
    under-tuned, and every arm compared against it would look better than it is. An extension is known as
    soon as the runs before it have finished, so the result is the whole sweep once all of it has finished."""
    lrs = tuple(sorted(base))
    if len(grid) < 2:
        return lrs
    low, high = min(grid), max(grid)
    while sum(lr < low or lr > high for lr in lrs) < BEYOND_GRID:
        best = choose_lr(arm, lrs, sweep_seed, results)
        if best is not None and best == lrs[0] and best <= low:
            lrs = (best / 2, *lrs)  # halving and doubling are exact in binary: 1e-3 / 2 == 5e-4
        elif best is not None and best == lrs[-1] and best >= high:
            lrs = (*lrs, best * 2)
        else:
            break
    return lrs


def beyond_grid_edge(lr: float | None, sweep: tuple[float, ...], grid: tuple[float, ...]) -> bool:
    """Whether a chosen LR is still the outermost of its sweep at or past the grid's edge: only when the
    extension stopped at BEYOND_GRID points (or for a one-point grid, never)."""
    if lr is None or len(grid) < 2 or not sweep:
        return False
    return (lr == min(sweep) and lr <= min(grid)) or (lr == max(sweep) and lr >= max(grid))


def follower_lrs(head: str, lrs: tuple[float, ...], sweep_seed: int, results: dict) -> tuple[float, ...] | None:
    """A follower's two sweep LRs: its head's best and one neighbour of it in the head's sweep (the grid and
    any LRs beyond its edge; at the sweep's edge its only neighbour, else the one whose head validation loss at
    `sweep_seed` was lower; a diverged LR counts as worst, a tie goes to the smaller LR). None until the
    head's whole sweep has finished; () when it all diverged."""
    swept = extend_sweep(head, lrs, lrs, sweep_seed, results)
    if any((head, lr, sweep_seed) not in results for lr in swept):
        return None
    best = choose_lr(head, swept, sweep_seed, results)
    if best is None:
        return ()
    grid = list(swept)
    if len(grid) == 1:
        return (best,)
    i = grid.index(best)
    if i == 0:
        neighbour = grid[1]
    elif i == len(grid) - 1:
        neighbour = grid[-2]
    else:
        def loss(lr: float) -> float:
            r = results[(head, lr, sweep_seed)]
            return r["val_loss"] if r["status"] == "ok" else math.inf

        below, above = grid[i - 1], grid[i + 1]
        neighbour = below if loss(below) <= loss(above) else above
    return tuple(sorted((best, neighbour)))


def init_winner(contest: tuple[str, ...], lrs: tuple[float, ...], sweep_seed: int,
                results: dict) -> tuple[bool, str | None]:
    """(decided, winner) of the SLoPe init contest: once every contestant's sweep has finished, the one with
    the lowest final VALIDATION loss at its chosen LR (never a test set; a tie goes to the first listed).
    The winner is None when every contestant diverged at every LR."""
    best = {}
    for arm in contest:
        swept = extend_sweep(arm, lrs, lrs, sweep_seed, results)
        if any((arm, lr, sweep_seed) not in results for lr in swept):
            return False, None
        lr = choose_lr(arm, swept, sweep_seed, results)
        if lr is not None:
            best[arm] = results[(arm, lr, sweep_seed)]["val_loss"]
    return True, (min(best, key=best.get) if best else None)


@dataclass(frozen=True)
class Plan:
    """One entry of the study as the finished runs resolve it now."""
    entry: str  # as listed: an arm or a conditional slot
    arm: str | None  # the arm it runs; None while a slot waits for its contest (or has nothing to run)
    head: str | None  # the arm whose sweep it follows; None: it sweeps the whole grid
    sweep: tuple[float, ...] | None  # its seed-0 LRs; None while unknown, () when nothing will run
    note: str = ""  # why it waits, or why nothing runs


def resolve(entries, lrs, seeds, results: dict) -> list[Plan]:
    """Each entry's arm and sweep LRs, as far as the finished runs decide them."""
    plans = []
    for entry in entries:
        arm = entry
        if entry in SLOTS:
            options = SLOTS[entry]
            decided, winner = init_winner(tuple(options), lrs, seeds[0], results)
            contest = " vs ".join(options)
            if not decided:
                plans.append(Plan(entry, None, None, None, f"waits for the SLoPe init contest ({contest})"))
                continue
            if winner is None:
                plans.append(Plan(entry, None, None, (), f"every LR of {contest} diverged"))
                continue
            arm = options[winner]
        head = FOLLOWS.get(arm)
        if head is None or head not in entries:
            plans.append(Plan(entry, arm, None, extend_sweep(arm, tuple(lrs), lrs, seeds[0], results)))
            continue
        sweep = follower_lrs(head, lrs, seeds[0], results)
        note = f"waits for {head}'s LR sweep" if sweep is None else f"every LR of {head} diverged" if not sweep else ""
        if sweep:
            sweep = extend_sweep(arm, sweep, lrs, seeds[0], results)
        plans.append(Plan(entry, arm, head, sweep, note))
    return plans


def follower_sweep_size(lrs) -> int:
    return min(2, len(lrs))


def plan_lr(plan: Plan, seeds, results: dict) -> float | None:
    """The plan's chosen LR; None until its sweep has finished (or when all of it diverged)."""
    return choose_lr(plan.arm, plan.sweep, seeds[0], results) if plan.sweep else None


def plan_runs(plan: Plan, seeds, results: dict) -> list[tuple[str, float, int]]:
    """The plan's runs known so far: its sweep, and its other seeds once the LR is chosen."""
    if not plan.sweep:
        return []
    runs = [(plan.arm, lr, seeds[0]) for lr in plan.sweep]
    lr = plan_lr(plan, seeds, results)
    return runs + ([(plan.arm, lr, s) for s in seeds[1:]] if lr is not None else [])


def runs_left(plan: Plan, lrs, seeds, results: dict) -> int:
    """The plan's runs still to do, counting those not known yet (a pending slot or follower: its two sweep
    runs and its other seeds; an arm mid-sweep: its other seeds)."""
    later = len(seeds) - 1
    if plan.sweep is None:
        return follower_sweep_size(lrs) + later
    if not plan.sweep:
        return 0
    missing = sum((plan.arm, lr, seeds[0]) not in results for lr in plan.sweep)
    lr = plan_lr(plan, seeds, results)
    if lr is None:
        return missing + (later if missing else 0)  # swept and all diverged: no seeds follow
    return sum((plan.arm, lr, s) not in results for s in seeds[1:])


def pending(arms, lrs, seeds, results: dict) -> list[tuple[str, float, int]]:
    """The runs that can start now, in order: every sweep whose LRs are known first (heads before followers),
    then seed by seed across the arms, so a study stopped early still has every arm at the same number of
    seeds (give or take one). A follower's runs appear only once its head's sweep has finished."""
    plans = resolve(arms, lrs, seeds, results)
    todo = [(p.arm, lr, seeds[0]) for p in plans for lr in (p.sweep or ()) if (p.arm, lr, seeds[0]) not in results]
    for seed in seeds[1:]:
        for p in plans:
            lr = plan_lr(p, seeds, results)
            if lr is not None and (p.arm, lr, seed) not in results:
                todo.append((p.arm, lr, seed))
    return list(dict.fromkeys(todo))


def remaining(arms, lrs, seeds, results: dict) -> int:
    """Runs still to do, counting the runs of slots and followers whose LRs are not known yet."""
    return sum(runs_left(p, lrs, seeds, results) for p in resolve(arms, lrs, seeds, results))


def planned(arms, lrs, seeds) -> int:
    """The study's runs before anything has run: a head len(lrs) + len(seeds) - 1, a follower or slot 2 + that."""
    return remaining(arms, lrs, seeds, {})


def beyond_grid(arms, lrs, seeds, results: dict) -> int:
    """Sweep runs the finished runs have added past the grid's edge (extend_sweep), on top of planned()."""
    return sum(lr < min(lrs) or lr > max(lrs) for p in resolve(arms, lrs, seeds, results) for lr in p.sweep or ())


def finished(arms, lrs, seeds, results: dict) -> int:
    """The study's runs that have finished (runs of other arms or LRs in the same folder do not count)."""
    return sum(key in results for p in resolve(arms, lrs, seeds, results) for key in plan_runs(p, seeds, results))


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


def _nominal(plan: Plan, arms, lrs, seeds) -> int:
    """A plan's runs before anything has run: a head's grid, or a follower's 2 LRs, plus the other seeds."""
    follows = plan.entry in SLOTS or FOLLOWS.get(plan.arm) in arms
    return (follower_sweep_size(lrs) if follows else len(lrs)) + len(seeds) - 1


def breakdown(arms, lrs, seeds) -> str:
    """The planned total as a sum, e.g. "4 heads x 5 + 4 followers x 4"."""
    counts: dict[tuple[str, int], int] = {}
    for p in resolve(arms, lrs, seeds, {}):
        kind = "heads" if p.head is None and p.entry not in SLOTS else "followers"
        counts[kind, _nominal(p, arms, lrs, seeds)] = counts.get((kind, _nominal(p, arms, lrs, seeds)), 0) + 1
    return " + ".join(f"{n} {kind} x {runs}" for (kind, runs), n in counts.items())


def plan_table(arms, lrs, seeds, results: dict) -> str:
    """The study's arms as the finished runs resolve them: what each follows, its LRs, runs done and left."""
    lines = ["| entry | arm | LRs at seed 0 | chosen LR | runs planned | finished | left |",
             "|---|---|---|---|---|---|---|"]
    for p in resolve(arms, lrs, seeds, results):
        nominal = _nominal(p, arms, lrs, seeds)
        if p.sweep is None:
            ran = sorted(k[1] for k in results if p.arm and k[0] == p.arm and k[2] == seeds[0])
            ran_text = f"; it has seed-0 runs at {', '.join(f'{x:g}' for x in ran)}" if ran else ""
            sweep = f"2: best of {p.head or 'the winner'} + a neighbour ({p.note}{ran_text})"
        elif not p.sweep:
            sweep = f"none ({p.note})"
        else:
            extra = sum(x < min(lrs) or x > max(lrs) for x in p.sweep)
            extra_text = f", {extra} beyond the grid's edge" if extra else ""
            sweep = ", ".join(f"{x:g}" for x in p.sweep) + (f" (follows {p.head}{extra_text})" if p.head
                                                           else f" (grid{extra_text})")
        lr = plan_lr(p, seeds, results)
        done = sum(key in results for key in plan_runs(p, seeds, results))
        lines.append(f"| {p.entry} | {p.arm or '(pending)'} | {sweep} | {'—' if lr is None else f'{lr:g}'} "
                     f"| {nominal} | {done} | {runs_left(p, lrs, seeds, results)} |")
    return "\n".join(lines)


# ---- the report ------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict | None:
    """mean, sample std (n - 1; None for one value), min, max and n; None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(arms, lrs, seeds, results: dict, settings: dict | None = None) -> list[dict]:
    """One row per study entry: the sweep, the chosen LR and the seeds' statistics at it, what is missing,
    and the Δ bits per byte against the fair dense baseline and against dense-half."""
    rows = []
    later = len(seeds) - 1
    for p in resolve(arms, lrs, seeds, results):
        arm = p.arm
        lr = plan_lr(p, seeds, results)
        sweep = {}
        for x in p.sweep or ():
            r = results.get((arm, x, seeds[0]))
            sweep[f"{x:g}"] = None if r is None else (r["val_loss"] if r["status"] == "ok" else "diverged")
        # seed-0 runs of the arm at LRs its sweep no longer holds (its head's sweep moved after they ran)
        outside = {f"{k[1]:g}": r["val_loss"] if r["status"] == "ok" else "diverged" for k, r in sorted(results.items())
                   if arm and k[0] == arm and k[2] == seeds[0] and k[1] not in (p.sweep or ())}
        runs = {s: results.get((arm, lr, s)) for s in seeds} if lr is not None else {}
        done = {s: r for s, r in runs.items() if r is not None and r["status"] == "ok"}
        if p.sweep is None:  # a slot or follower whose LRs are not known yet
            missing = [f"{arm or p.entry}: {follower_sweep_size(lrs)} sweep runs + {later} seeds ({p.note})"]
        elif not p.sweep:
            missing = []
        else:
            missing = [run_name(arm, x, seeds[0]) for x in p.sweep if sweep[f"{x:g}"] is None]
            if lr is not None:
                missing += [run_name(arm, lr, s) for s in seeds if runs.get(s) is None]
            elif missing:
                missing += [f"{arm} seed {s} (after the sweep)" for s in seeds[1:]]
        row = {
            "arm": arm or p.entry, "entry": p.entry, "follows": p.head, "note": p.note,
            "method": ARMS[arm][0] if arm else None,
            "overrides": list(arm_overrides(arm, settings)) if arm else [],
            "sweep_lrs": list(p.sweep) if p.sweep is not None else None,
            "lr": lr, "lr_at_edge": beyond_grid_edge(lr, p.sweep or (), lrs),
            "sweep_val_loss": sweep, "outside_sweep_val_loss": outside,
            "seeds_done": sorted(done),
            "seeds_diverged": sorted(s for s, r in runs.items() if r is not None and r["status"] != "ok"),
            "seeds_missing": [s for s in seeds if runs.get(s) is None],
            "missing_runs": missing,
            "parameters": next(iter(done.values()))["parameters"] if done else None,
        }
        for name in TEST_SETS:
            for key in ("ppl", "bpb"):
                row[f"{name}_{key}"] = stats([r["eval"][name][key] for r in done.values()])
        row["val_loss"] = stats([r["val_loss"] for r in done.values()])
        row["best_val_loss"] = stats([r["best_val_loss"] for r in done.values()])
        row["grad_norm_mean"] = stats([r["grad_norm_mean"] for r in done.values() if r["grad_norm_mean"] is not None])
        row["clip_rate"] = stats([r["clip_rate"] for r in done.values() if r["clip_rate"] is not None])
        rows.append(row)
    by_arm = {row["arm"]: row for row in rows}
    # the fair dense baseline; a study without it (e.g. --quick) compares against default-init dense
    fair = by_arm.get(FAIR_DENSE) or by_arm.get("dense")
    half = by_arm.get(DENSE_HALF)
    for row in rows:
        row["fair_dense"] = fair["arm"] if fair else None
        for name in TEST_SETS:
            row[f"{name}_bpb_vs_fair_dense"] = (
                difference(row[f"{name}_bpb"], fair[f"{name}_bpb"]) if fair and row is not fair else None)
            row[f"{name}_bpb_vs_dense_half"] = (
                difference(row[f"{name}_bpb"], half[f"{name}_bpb"]) if half and row is not half else None)
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


def reproduction(results: dict) -> list[dict]:
    """The study's own runs against the earlier hand-run results (REPRODUCTION): each value within one unit
    of the last digit given. The earlier figures were rounded by hand from printed, already rounded values,
    and rounding twice can land one unit off (4.85345 printed as 4.8535, then written 4.854); a run that is
    not the same run misses by far more. `got` shows one digit more than the expected value."""
    checks = []
    for arm, lr, seed, val, sh_ppl, milton_ppl in REPRODUCTION:
        r = results.get((arm, lr, seed))
        expected = {"val_loss": val, "shakespeare-heldout_ppl": sh_ppl, "milton_ppl": milton_ppl}
        got, match = None, None
        if r is not None and r["status"] == "ok":
            values = {"val_loss": r["val_loss"], "shakespeare-heldout_ppl": r["eval"]["shakespeare-heldout"]["ppl"],
                      "milton_ppl": r["eval"]["milton"]["ppl"]}
            digits = {k: len(e.partition(".")[2]) for k, e in expected.items()}
            got = {k: f"{values[k]:.{digits[k] + 1}f}" for k in expected}
            match = all(abs(values[k] - float(e)) <= 10.0 ** -digits[k] * (1 + 1e-9) for k, e in expected.items())
        elif r is not None:
            got, match = "diverged", False
        checks.append({"run": run_name(arm, lr, seed), "expected": expected, "got": got, "reproduced": match})
    return checks


def _fmt(s: dict | None, digits: int) -> str:
    if not s:
        return "—"
    std = f" ± {s['std']:.{digits}f}" if s["std"] is not None else ""
    return f"{s['mean']:.{digits}f}{std} (n={s['n']})"


def _fmt_diff(d: dict | None) -> str:
    if not d:
        return "—"
    return f"{d['diff']:+.4f}" + (f" ± {d['se']:.4f}" if d["se"] is not None else " (no s.e.: < 2 seeds)")


def tables(rows: list[dict], checks: list[dict]) -> str:
    fair = rows[0]["fair_dense"] if rows else None
    quality = [
        "| arm | follows | LR | seeds | Shakespeare held-out ppl | Shakespeare bpb | Milton ppl | Milton bpb "
        f"| Δ Shakespeare bpb vs {fair} | Δ Milton bpb vs {fair} | Δ Shakespeare bpb vs dense-half "
        "| Δ Milton bpb vs dense-half |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds = len(row["seeds_done"]) + len(row["seeds_missing"]) + len(row["seeds_diverged"])
        lr = "—" if row["lr"] is None else f"{row['lr']:g}" + (" (edge)" if row["lr_at_edge"] else "")
        arm = row["arm"] if row["entry"] == row["arm"] else f"{row['arm']} ({row['entry']})"
        quality.append(
            f"| {arm} | {row['follows'] or '—'} | {lr} | {len(row['seeds_done'])}/{seeds} "
            f"| {_fmt(row['shakespeare-heldout_ppl'], 2)} | {_fmt(row['shakespeare-heldout_bpb'], 4)} "
            f"| {_fmt(row['milton_ppl'], 2)} | {_fmt(row['milton_bpb'], 4)} "
            f"| {_fmt_diff(row['shakespeare-heldout_bpb_vs_fair_dense'])} | {_fmt_diff(row['milton_bpb_vs_fair_dense'])} "
            f"| {_fmt_diff(row['shakespeare-heldout_bpb_vs_dense_half'])} | {_fmt_diff(row['milton_bpb_vs_dense_half'])} |")
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
        for lr, loss in row["outside_sweep_val_loss"].items():
            cells.append(f"({lr}: {loss if isinstance(loss, str) else f'{loss:.4f}'}, outside the sweep)")
        missing = ", ".join(row["missing_runs"]) or "none"
        if row["seeds_diverged"]:
            missing += f"; diverged seeds: {row['seeds_diverged']}"
        if row["note"] and row["sweep_lrs"] == []:
            missing += f" ({row['note']}: nothing runs)"
        training.append(f"| {row['arm']} | {'; '.join(cells) or '—'} | {_fmt(row['val_loss'], 4)} "
                        f"| {_fmt(row['best_val_loss'], 4)} | {_fmt(row['grad_norm_mean'], 3)} "
                        f"| {_fmt(row['clip_rate'], 3)} | {missing} |")
    out = ["## Held-out quality (mean ± std over seeds, at each arm's chosen LR)", "", *quality, "",
           "## LR sweep and training", "", *training]
    if checks:
        out += ["", "## Reproduction check (earlier hand-run results; the study's own runs, within one unit of the last digit)", "",
                "| run | final val loss expected / got | Shakespeare ppl expected / got | Milton ppl expected / got "
                "| reproduced |", "|---|---|---|---|---|"]
        for c in checks:
            got = c["got"] if isinstance(c["got"], dict) else {k: c["got"] or "not run yet" for k in c["expected"]}
            verdict = {None: "not run yet", True: "yes", False: "**no**"}[c["reproduced"]]
            out.append(f"| {c['run']} | " + " | ".join(f"{c['expected'][k]} / {got[k]}" for k in c["expected"])
                       + f" | {verdict} |")
    return "\n".join(out)


def plot(rows: list[dict], results: dict, path: Path, scale: str) -> bool:
    """Every arm's validation-loss curve at its chosen LR: the mean over seeds and the min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors
    drawn = False
    for i, row in enumerate(rows):
        if row["lr"] is None:
            continue
        curves = [dict(map(tuple, results[(row["arm"], row["lr"], s)]["val_curve"])) for s in row["seeds_done"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[step] for c in curves] for step in steps]
        color = colors[(2 * i) % len(colors)]
        style = "--" if row["method"] == "dense" else "-"
        ax.plot(steps, [statistics.fmean(v) for v in values], style, color=color,
                label=f"{row['arm']} (lr {row['lr']:g}, {len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (held-out 5 % of the training corpus)")
        ax.set_title(f"accuracy study {scale}: validation loss, mean over seeds, band = min–max (dense dashed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def contest_text(arms, lrs, seeds, results: dict) -> str | None:
    """The SLoPe init contest's state, for the report; None when the study has no conditional slot."""
    slot = next((e for e in arms if e in SLOTS), None)
    if slot is None:
        return None
    contest = tuple(SLOTS[slot])
    decided, winner = init_winner(contest, lrs, seeds[0], results)
    if not decided:
        return (f"SLoPe init contest ({' vs '.join(contest)}): not decided yet (it needs both seed-0 sweeps); "
                f"the @winning-init arms wait for it.")
    if winner is None:
        return f"SLoPe init contest ({' vs '.join(contest)}): every LR diverged; the @winning-init arms do not run."
    parts = []
    for arm in contest:
        lr = choose_lr(arm, extend_sweep(arm, lrs, lrs, seeds[0], results), seeds[0], results)
        parts.append(f"{arm} {results[(arm, lr, seeds[0])]['val_loss']:.4f} at lr {lr:g}" if lr is not None
                     else f"{arm} diverged")
    return (f"SLoPe init contest, by final validation loss at seed 0 and each arm's chosen LR: {'; '.join(parts)}. "
            f"Winner: {winner}; the @winning-init slots run its arms.")


def write_report(scale: str, arms, lrs, seeds, settings: dict, results: dict, runs_dir: Path, report_dir: Path) -> Path:
    rows = aggregate(arms, lrs, seeds, results, settings)
    name = f"accuracy_{scale}"
    report_dir.mkdir(parents=True, exist_ok=True)
    has_plot = plot(rows, results, report_dir / f"{name}.png", scale)
    extended = beyond_grid(arms, lrs, seeds, results)
    total, left = planned(arms, lrs, seeds) + extended, remaining(arms, lrs, seeds, results)
    by_arm = {row["arm"]: row for row in rows}
    fair = by_arm.get(rows[0]["fair_dense"]) if rows else None
    sized = fair if fair and fair["parameters"] else next((r for r in rows if r["parameters"]), None)
    first = next((r for r in results.values() if r["arm"] in by_arm and r.get("status") == "ok"), None)
    slot = next((e for e in arms if e in SLOTS), None)
    winner = init_winner(tuple(SLOTS[slot]), lrs, seeds[0], results)[1] if slot else None
    metrics = {"runs_planned": total, "runs_beyond_grid_edge": extended, "runs_finished": finished(arms, lrs, seeds, results), "runs_left": left,
               "steps_per_run": settings["steps"],
               "tokens_per_run": first["tokens"] if first else None,
               "parameters": sized["parameters"]["dense_equivalent"] if sized else None,
               "fair_dense_arm": rows[0]["fair_dense"] if rows else None,
               "slope_init_winner": winner}
    for arm in ("slope", "slope-init0.71"):
        row = by_arm.get(arm)
        for set_name in TEST_SETS:
            for ref, key in (("fair_dense", "vs_fair_dense"), ("dense_half", "vs_dense_half")):
                d = row and row[f"{set_name}_bpb_{key}"]
                metrics[f"{set_name}_bpb_{arm}_minus_{ref}"] = d["diff"] if d else None
                metrics[f"{set_name}_bpb_{arm}_minus_{ref}_se"] = d["se"] if d else None
    checks = reproduction(results) if scale == "8m" else []
    for c in checks:
        metrics[f"reproduced_{c['run']}"] = c["reproduced"]
    status = ("complete" if left == 0 else
              f"PARTIAL: {left} of {total} runs still missing (listed per arm in the table above); rerun the same command to continue")
    contest = contest_text(arms, lrs, seeds, results)
    threads = sorted({str(r.get("threads", "not recorded")) for r in results.values() if r["arm"] in by_arm})
    places: dict[str, int] = {}  # "cpu float32" -> runs
    for r in results.values():
        if r["arm"] in by_arm and r.get("status") == "ok":
            place = f"{r.get('device', '?')} {r.get('precision', '?')}"
            places[place] = places.get(place, 0) + 1
    notes = "\n\n".join(filter(None, [
        f"Study status: {status}.",
        contest,
        f"Scale `{scale}`: `slope train{' --config ' + settings['config'] if settings['config'] else ''}` with "
        f"{' '.join(settings['model']) or 'its default model'}, {settings['steps']} steps for every arm "
        f"(the same tokens for all), trained on `{settings['train_data']}`. LR grid {', '.join(f'{x:g}' for x in lrs)} "
        f"at seed {seeds[0]} for the family heads; a follower (\"follows\") sweeps its head's best LR and one grid "
        f"neighbour of it; seeds {', '.join(map(str, seeds))} at the chosen LR. Threads per run: {', '.join(threads) or '—'}. "
        f"Trained on: {', '.join(f'{k} ({n} runs)' for k, n in sorted(places.items())) or '—'}.",
        "The LR is chosen by the final loss on the held-out last 5 % of the training corpus (`--data.val=`, "
        f"`--data.val_fraction={VAL_FRACTION}`); the reported sets (Shakespeare's held-out works, Milton) are evaluated "
        "once at the end of each run and never used to choose anything. An arm whose best LR is the grid's edge "
        f"also runs past it (half or twice the LR, at most {BEYOND_GRID} LRs beyond the edge) before its seeds; "
        "\"(edge)\": the chosen LR is still the outermost after that, so a wider sweep might do better.",
        f"Std is the sample standard deviation over seeds (n − 1). Δ vs {rows[0]['fair_dense'] if rows else 'dense'} "
        "(the fair dense baseline: same shape, init ×0.7071) and Δ vs dense-half (half the blocks: about the 2:4 "
        "model's non-zero weights): the arm's mean minus the reference's, ± the standard error of that difference "
        "from the two seed spreads; a Δ within about two standard errors is not a difference the seeds can tell "
        "apart. Negative is better for the arm. Grad norms are before clipping, over every step; the clip rate is "
        "the share of steps clipped (at optim.grad_clip = 1.0, except dense-noclip).",
        "Per-run results (including each run's exact `slope train` command): "
        f"`{_report._repo_relative(str(runs_dir))}/`." + (f" Plot: `{name}.png`." if has_plot else ""),
    ]))
    path = _report.write(name, metrics, rows, tables(rows, checks), notes, out_dir=report_dir)
    return path


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


def check_arms(arms: tuple[str, ...]) -> str | None:
    """Why a list of arms and slots is not a study, or None."""
    unknown = [a for a in arms if a not in ARMS and a not in SLOTS]
    if unknown:
        return f"unknown arm(s) {', '.join(unknown)}; arms are {', '.join(ARMS)}; slots are {', '.join(SLOTS)}"
    if len(set(arms)) != len(arms):
        return "an arm is listed twice"
    for slot in (a for a in arms if a in SLOTS):
        absent = [c for c in SLOTS[slot] if c not in arms]
        if absent:
            return f"{slot} needs its contest's arms in the study too: add {', '.join(absent)}"
        listed = [a for a in SLOTS[slot].values() if a in arms]
        if listed:
            return f"{slot} runs one of {', '.join(SLOTS[slot].values())}: list the slot or the arm(s), not both"
    return None


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
