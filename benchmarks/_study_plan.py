"""The quality study's design, and which runs it needs in which order (benchmarks/accuracy.py runs them).

An arm is a `slope train --method` and the overrides that make it (ARMS). The four family heads sweep the
scale's LR grid; a follower (FOLLOWS) sweeps its head's best LR and one neighbour of it; a slot (SLOTS) runs
the arm of whichever SLoPe init wins; an arm whose best LR is the grid's edge sweeps past it (extend_sweep).
Every function here is a pure function of the finished runs, `results`: {(arm, lr, seed): run record}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# ---- arms and scales ----------------------------------------------------------------------------------

# arm -> (slope train --method, the overrides that make the arm). The srste and wanda values and every init
# scale are written out, so each arm keeps its meaning when a default changes (the study changed dense's and
# SLoPe's, docs/methods.md) and each run's record says what it ran with. "{half_layers}" is half the scale's blocks.
INIT1, INIT071 = "--model.linear_init_scale=1.0", "--model.linear_init_scale=0.7071"
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dense": ("dense", (INIT1,)),
    # Init-scale controls. sqrt(n/m) = 0.7071 is the output scale of dropping half the weights at random;
    # a 2:4 magnitude prune keeps about 87 % of a Gaussian layer's weight energy, an output scale of
    # about 0.93 (docs/methods.md), so both bracket where SLoPe's pruned layers start.
    "dense-init0.71": ("dense", (INIT071,)),
    "dense-init0.93": ("dense", ("--model.linear_init_scale=0.93",)),
    "dense-noclip": ("dense", (INIT1, "--optim.grad_clip=0")),  # does gradient clipping favour one arm?
    # the paper's GPT2-Half: half the blocks, about the non-zero weights of the 2:4 model, at the fair init
    "dense-half": ("dense", ("--model.num_layers={half_layers}", INIT071)),
    "slope": ("slope", (INIT1,)),  # adapters for the last 1 % of steps (the default)
    "slope-init0.71": ("slope", (INIT071,)),
    "slope-adapters0.9": ("slope", (INIT1, "--slope.adapter_start=0.9")),
    "slope-init0.71-adapters0.9": ("slope", (INIT071, "--slope.adapter_start=0.9")),
    "slope-nodp": ("slope", (INIT1, "--slope.double_prune=false")),
    "srste": ("srste", ("--method.srste_decay=2e-4", INIT1)),
    "srste-init0.71": ("srste", ("--method.srste_decay=2e-4", INIT071)),
    "wanda": ("wanda", ("--method.wanda_dense_fraction=0.5", INIT1)),
    "wanda-init0.71": ("wanda", ("--method.wanda_dense_fraction=0.5", INIT071)),
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


# ---- which runs, in which order ---------------------------------------------------------------------


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
    """Sweep runs the finished runs have added past the grid's edge (extend_sweep), on top of planned(): a
    sweep's LRs beyond its nominal size (the grid for a head, 2 for a follower, whose 2 may themselves lie
    past the edge when its head's best does)."""
    return sum(max(0, len(p.sweep) - (follower_sweep_size(lrs) if p.head else len(lrs)))
               for p in resolve(arms, lrs, seeds, results) if p.sweep)


def finished(arms, lrs, seeds, results: dict) -> int:
    """The study's runs that have finished (runs of other arms or LRs in the same folder do not count)."""
    return sum(key in results for p in resolve(arms, lrs, seeds, results) for key in plan_runs(p, seeds, results))


# ---- the plan as a table, and the arms a study may list ------------------------------------------------


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
