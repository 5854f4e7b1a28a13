"""benchmarks/accuracy.py: LR selection by validation only, followers and the SLoPe init contest, the seed
statistics and the Δ against the fair dense baseline and dense-half, resume, --jobs, --threads, missing runs,
and one real tiny run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from _benchmarks import BENCH, benchmark_module

SETTINGS = {"scale": "test", "config": "tiny", "model": [], "steps": 2, "train_data": "shakespeare",
            "eval_every": 1, "extra": [], "warmup": []}


@pytest.fixture(scope="module")
def acc():
    with benchmark_module("accuracy") as module:
        yield module


@pytest.fixture(scope="module")
def plan(acc):
    """The study's design and order (benchmarks/_study_plan.py), as accuracy.py imported it."""
    return sys.modules["benchmarks._study_plan"]


@pytest.fixture(scope="module")
def rep(acc):
    """The study's report (benchmarks/_study_report.py), as accuracy.py imported it."""
    return sys.modules["benchmarks._study_report"]


@pytest.fixture
def diverging_runs(acc, monkeypatch):
    """`slope train` replaced by a process that diverges at once, so nothing trains: the list it returns
    gets each run's {"command", "env"} as the study starts it. Other processes run as usual."""
    seen, real_popen = [], acc.subprocess.Popen

    class FakePopen:
        def __new__(cls, command, *args, **kwargs):  # anything else, e.g. platform asking `uname`, runs
            return super().__new__(cls) if command[1:4] == ["-m", "slope", "train"] else real_popen(
                command, *args, **kwargs)

        def __init__(self, command, stdout, stderr, env):
            seen.append({"command": command, "env": env})
            stdout.write("training...\nthe loss became nan at step 1\n")
            stdout.flush()

        def wait(self):
            return 1

        def kill(self):
            pass

    monkeypatch.setattr(acc.subprocess, "Popen", FakePopen)
    return seen


def record(arm, lr, seed, val_loss, sh_bpb=2.5, milton_bpb=3.5, milton_ppl=1000.0, status="ok"):
    """A finished run's JSON as the study writes it, with made-up numbers."""
    return {
        "arm": arm, "method": arm, "lr": lr, "seed": seed, "settings": SETTINGS, "status": status,
        "val_loss": val_loss, "best_val_loss": val_loss,
        "eval": {"val": {"loss": val_loss, "ppl": 1.0, "bpb": 1.0, "tokens": 1},
                 "shakespeare-heldout": {"loss": 1.0, "ppl": 200.0, "bpb": sh_bpb, "tokens": 1},
                 "milton": {"loss": 1.0, "ppl": milton_ppl, "bpb": milton_bpb, "tokens": 1}},
        "val_curve": [] if val_loss is None else [[1, val_loss + 1], [2, val_loss]], "grad_norm_mean": 1.5, "clip_rate": 0.5,
        "tokens": 512, "parameters": {"stored": 10, "dense_equivalent": 10}, "wall_seconds": 10.0,
    }


def test_lr_is_chosen_by_validation_loss_never_by_a_test_set(plan, rep):
    # lr 2e-3 has the lowest validation loss; Milton (and Shakespeare) would pick 1e-3
    results = {
        ("dense", 1e-3, 0): record("dense", 1e-3, 0, val_loss=5.0, sh_bpb=2.0, milton_bpb=3.0, milton_ppl=500.0),
        ("dense", 2e-3, 0): record("dense", 2e-3, 0, val_loss=4.8, sh_bpb=2.4, milton_bpb=3.4, milton_ppl=900.0),
        ("dense", 4e-3, 0): record("dense", 4e-3, 0, val_loss=4.9, sh_bpb=2.2, milton_bpb=3.2, milton_ppl=700.0),
    }
    assert plan.choose_lr("dense", (1e-3, 2e-3, 4e-3), 0, results) == 2e-3
    (row,) = rep.aggregate(("dense",), (1e-3, 2e-3, 4e-3), (0,), results)
    assert row["lr"] == 2e-3 and not row["lr_at_edge"]
    assert row["milton_ppl"]["mean"] == 900.0  # reported at the chosen LR, whatever the test sets say
    # the seeds after the sweep run at the chosen LR
    assert plan.pending(("dense",), (1e-3, 2e-3, 4e-3), (0, 1), results) == [("dense", 2e-3, 1)]


def test_lr_selection_waits_for_the_whole_sweep_and_skips_diverged_lrs(plan):
    lrs = (1e-3, 2e-3)
    partial = {("slope", 1e-3, 0): record("slope", 1e-3, 0, val_loss=5.0)}
    assert plan.choose_lr("slope", lrs, 0, partial) is None
    diverged = {**partial, ("slope", 2e-3, 0): record("slope", 2e-3, 0, val_loss=None, status="diverged")}
    assert plan.choose_lr("slope", lrs, 0, diverged) == 1e-3


def test_seed_statistics_match_hand_arithmetic(rep):
    lrs, seeds = (1e-3,), (0, 1, 2)
    results = {}
    for seed, (dense_bpb, slope_bpb) in enumerate([(2.0, 2.0), (2.1, 2.2), (2.3, 2.6)]):
        results[("dense", 1e-3, seed)] = record("dense", 1e-3, seed, 5.0, sh_bpb=dense_bpb)
        results[("slope", 1e-3, seed)] = record("slope", 1e-3, seed, 5.0, sh_bpb=slope_bpb)
    dense, sparse = rep.aggregate(("dense", "slope"), lrs, seeds, results)
    # slope: mean (2.0 + 2.2 + 2.6) / 3 = 2.266667; deviations -0.266667, -0.066667, 0.333333;
    # squares 0.071111 + 0.004444 + 0.111111 = 0.186667; / (3 - 1) = 0.093333; sqrt = 0.305505
    s = sparse["shakespeare-heldout_bpb"]
    assert s["mean"] == pytest.approx(2.266667, abs=1e-6)
    assert s["std"] == pytest.approx(0.305505, abs=1e-6)
    assert (s["min"], s["max"], s["n"]) == (2.0, 2.6, 3)
    # dense: mean 2.133333; squares 0.017778 + 0.001111 + 0.027778 = 0.046667; / 2 = 0.023333; sqrt = 0.152753
    assert dense["shakespeare-heldout_bpb"]["std"] == pytest.approx(0.152753, abs=1e-6)
    # difference 2.266667 - 2.133333 = 0.133333; s.e. sqrt(0.093333 / 3 + 0.023333 / 3) = sqrt(0.038889) = 0.197203
    # no dense-init0.71 in this study: the fair baseline falls back to default-init dense
    assert sparse["fair_dense"] == "dense"
    d = sparse["shakespeare-heldout_bpb_vs_fair_dense"]
    assert d["diff"] == pytest.approx(0.133333, abs=1e-6)
    assert d["se"] == pytest.approx(0.197203, abs=1e-6)
    one_seed = rep.stats([3.0])
    assert one_seed["mean"] == 3.0 and one_seed["std"] is None


def test_resume_skips_finished_runs(acc, tmp_path):
    arms, lrs, seeds = ("dense", "slope"), (1e-3, 2e-3, 4e-3), (0, 1, 2)
    calls, kill_at = [], [3]

    def runner(settings, arm, lr, seed, work, threads=None, device=None):
        calls.append((arm, lr, seed))
        assert len(calls) <= 10, "the study trains runs that have finished"  # rather than loop for ever
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt  # the study is killed during this run
        loss = {1e-3: 5.01, 2e-3: 5.0, 4e-3: 5.02}[lr]  # the best inside the grid: no LR beyond it
        return {k: v for k, v in record(arm, lr, seed, val_loss=loss).items()
                if k not in ("arm", "method", "lr", "seed", "settings")}

    with pytest.raises(KeyboardInterrupt):
        acc.run_study(arms, lrs, seeds, SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2  # only the killed run is lost
    first = calls[:2]
    calls.clear()
    kill_at[0] = None
    results = acc.run_study(arms, lrs, seeds, SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner)
    assert not set(first) & set(calls)  # nothing finished is trained again
    # 2 arms x (3 sweep LRs + 2 more seeds at the chosen LR, 2e-3 by its lower validation loss)
    assert len(first) + len(calls) == 10 and len(results) == 10
    assert ("dense", 2e-3, 2) in results and ("dense", 1e-3, 2) not in results
    calls.clear()
    acc.run_study(arms, lrs, seeds, SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner)
    assert calls == []  # a finished study runs nothing


def test_results_of_other_settings_are_refused(acc, plan, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "dense-lr0.001-seed0.json").write_text(json.dumps(record("dense", 1e-3, 0, 5.0)))
    with pytest.raises(plan.StudyError, match="other settings"):
        acc.load_results(runs, {**SETTINGS, "steps": 800})


def test_missing_runs_are_reported_as_missing(plan, rep, tmp_path):
    arms, lrs, seeds = ("dense", "slope"), (1e-3, 2e-3, 4e-3), (0, 1)
    results = {  # dense: sweep done (best inside the grid), seed 1 missing; slope: a third of its sweep
        ("dense", 1e-3, 0): record("dense", 1e-3, 0, 5.0),
        ("dense", 2e-3, 0): record("dense", 2e-3, 0, 4.0),
        ("dense", 4e-3, 0): record("dense", 4e-3, 0, 4.5),
        ("slope", 1e-3, 0): record("slope", 1e-3, 0, 5.0),
    }
    dense, sparse = rep.aggregate(arms, lrs, seeds, results)
    assert dense["seeds_done"] == [0] and dense["seeds_missing"] == [1]
    assert dense["missing_runs"] == ["dense-lr0.002-seed1"]
    assert sparse["lr"] is None and sparse["shakespeare-heldout_bpb"] is None
    assert sparse["missing_runs"] == ["slope-lr0.002-seed0", "slope-lr0.004-seed0", "slope seed 1 (after the sweep)"]
    assert plan.remaining(arms, lrs, seeds, results) == 4
    path = rep.write_report("test", arms, lrs, seeds, SETTINGS, results, tmp_path / "runs", tmp_path)
    md = path.with_suffix(".md").read_text()
    assert "PARTIAL: 4 of 8 runs still missing" in md
    assert "slope-lr0.002-seed0" in md and "dense-lr0.002-seed1" in md
    assert json.loads(path.read_text())["metrics"]["runs_left"] == 4


def test_one_real_tiny_run_end_to_end(acc, tmp_path):
    """1 arm x 1 LR x 1 seed x 2 steps of the tiny config, through `slope train` in a subprocess."""
    command = [sys.executable, str(BENCH / "accuracy.py"), "--quick", "--arms", "dense", "--seeds", "0",
               "--steps", "2", "--threads", "1", "--work", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    study = tmp_path / "slope-accuracy-quick"
    saved = json.loads((study / "study" / "runs" / "dense-lr0.01-seed0.json").read_text())
    assert saved["status"] == "ok" and saved["settings"]["steps"] == 2
    assert saved["threads"] == 1 and "threads" not in saved["settings"]
    assert set(saved["eval"]) == {"val", "shakespeare-heldout", "milton"}
    assert "--data.val=" in saved["command"] and "--data.val_fraction=0.05" in saved["command"]
    # the LR sweep compares the final loss on the training corpus' held-out split, nothing else
    assert saved["val_loss"] == saved["eval"]["val"]["loss"] == saved["val_curve"][-1][1]
    assert saved["val_curve"][-1][0] == 2 and saved["clip_rate"] is not None
    # the median of the two logged step times is their mean: half the training loop's time (a few roundings)
    assert 2 * saved["median_step_seconds"] == pytest.approx(saved["train_seconds"], rel=1e-9)
    assert not (study / "dense-lr0.01-seed0").exists()  # the run directory is deleted once its JSON is saved
    report = json.loads((study / "study" / "accuracy_quick.json").read_text())
    assert report["metrics"]["runs_left"] == 0
    assert report["rows"][0]["milton_bpb"]["n"] == 1


# ---- the 8m study's design: followers, the SLoPe init contest, counts, Δs, --jobs, --threads ----------

GRID = (1e-3, 2e-3, 4e-3)
SETTINGS_8M = {"scale": "8m", "config": None, "model": [], "steps": 800, "train_data": "shakespeare",
               "eval_every": 50, "extra": [], "warmup": []}  # exactly as the 8m study's first runs recorded it


def sweep(arm, losses, **test_sets):
    """Seed-0 records of `arm` at GRID with the given validation losses (test-set numbers as given)."""
    return {(arm, lr, 0): record(arm, lr, 0, val_loss=loss, **test_sets) for lr, loss in zip(GRID, losses, strict=True)}


@pytest.mark.parametrize("head_losses, head_beyond, follower_lrs", [
    ((4.8, 4.9, 5.0), {5e-4: 5.1}, (1e-3, 2e-3)),  # best at the low edge (5e-4 below it is worse): 2e-3
    ((5.0, 4.9, 4.8), {8e-3: 5.1}, (2e-3, 4e-3)),  # best at the high edge (8e-3 above it is worse): 2e-3
    ((4.95, 4.8, 4.9), {}, (2e-3, 4e-3)),  # interior: the neighbour with the lower head validation loss (4e-3)...
    ((4.9, 4.8, 4.95), {}, (1e-3, 2e-3)),  # ...or 1e-3
])
def test_a_follower_sweeps_its_heads_best_lr_and_the_right_neighbour(plan, rep, head_losses, head_beyond,
                                                                      follower_lrs):
    # the test sets prefer the other neighbour every time: they must play no part
    worse_first = head_losses[0] > head_losses[2]
    results = {(a, lr, 0): record(a, lr, 0, val_loss=loss, sh_bpb=1.0 if (lr == 1e-3) == worse_first else 3.0,
                                  milton_bpb=1.0 if (lr == 1e-3) == worse_first else 3.0)
               for a in ("dense-init0.71",) for lr, loss in zip(GRID, head_losses, strict=True)}
    arms, seeds = ("dense-init0.71", "dense-half"), (0, 1, 2)
    if head_beyond:  # the head's best is the grid's edge: the follower waits for the LR beyond it
        assert plan.follower_lrs("dense-init0.71", GRID, 0, results) is None
        results.update({("dense-init0.71", lr, 0): record("dense-init0.71", lr, 0, val_loss=loss)
                        for lr, loss in head_beyond.items()})
    assert plan.follower_lrs("dense-init0.71", GRID, 0, results) == follower_lrs
    todo = plan.pending(arms, GRID, seeds, results)
    assert [k for k in todo if k[0] == "dense-half"] == [("dense-half", lr, 0) for lr in follower_lrs]
    # the follower's own choice between its two LRs is by its validation loss (2e-3, inside the grid, so
    # nothing is added beyond it), then the seeds run there
    low, high = follower_lrs
    results[("dense-half", low, 0)] = record("dense-half", low, 0, val_loss=5.2 if low != 2e-3 else 5.1,
                                             sh_bpb=1.0 if low != 2e-3 else 3.0)
    results[("dense-half", high, 0)] = record("dense-half", high, 0, val_loss=5.1 if high == 2e-3 else 5.2,
                                              sh_bpb=3.0 if high == 2e-3 else 1.0)
    assert [k for k in plan.pending(arms, GRID, seeds, results) if k[0] == "dense-half"] == [
        ("dense-half", 2e-3, 1), ("dense-half", 2e-3, 2)]
    (_, half) = rep.aggregate(arms, GRID, seeds, results)
    assert half["lr"] == 2e-3 and half["follows"] == "dense-init0.71" and half["sweep_lrs"] == list(follower_lrs)


def test_a_follower_waits_for_its_heads_whole_sweep(plan):
    results = {k: v for k, v in sweep("dense-init0.71", (4.8, 4.9, 5.0)).items() if k[1] != 4e-3}
    arms = ("dense-init0.71", "dense-half")
    assert plan.follower_lrs("dense-init0.71", GRID, 0, results) is None
    assert plan.pending(arms, GRID, (0, 1, 2), results) == [("dense-init0.71", 4e-3, 0)]
    # listed without its head, a follower sweeps the whole grid itself
    assert plan.pending(("dense-half",), GRID, (0,), {}) == [("dense-half", lr, 0) for lr in GRID]


@pytest.mark.parametrize("winner", ["slope", "slope-init0.71"])
def test_the_slope_init_contest_is_decided_by_validation_loss_only(plan, winner):
    loser = "slope-init0.71" if winner == "slope" else "slope"
    # the winner's best validation loss is lower; the test sets strongly prefer the loser
    results = {**sweep(winner, (4.9, 4.85, 5.0), sh_bpb=3.0, milton_bpb=4.0, milton_ppl=2000.0),
               **sweep(loser, (4.95, 4.88, 5.0), sh_bpb=1.0, milton_bpb=2.0, milton_ppl=100.0)}
    assert plan.init_winner(("slope", "slope-init0.71"), GRID, 0, results) == (True, winner)
    arms = ("slope", "slope-init0.71", "adapters0.9@winning-init", "srste@winning-init", "wanda@winning-init")
    plans = {p.entry: p for p in plan.resolve(arms, GRID, (0, 1, 2), results)}
    suffix = "" if winner == "slope" else "-init0.71"
    assert plans["srste@winning-init"].arm == f"srste{suffix}"
    assert plans["wanda@winning-init"].arm == f"wanda{suffix}"
    assert plans["adapters0.9@winning-init"].arm == f"slope{suffix}-adapters0.9"
    # it follows the winner's sweep: best 2e-3, interior, the neighbour with the lower loss is 1e-3
    assert plans["srste@winning-init"].head == winner and plans["srste@winning-init"].sweep == (1e-3, 2e-3)
    assert (f"srste{suffix}", 1e-3, 0) in plan.pending(arms, GRID, (0, 1, 2), results)


def test_conditional_slots_count_as_pending_runs_before_the_winner_is_known(plan):
    arms, seeds = plan.SCALES["8m"].arms, (0, 1, 2)
    results = {**sweep("dense", (5.0, 4.9, 5.2)), **sweep("slope", (4.9, 4.85, 5.0))}  # slope-init0.71 not run
    plans = {p.entry: p for p in plan.resolve(arms, GRID, seeds, results)}
    for slot in ("adapters0.9@winning-init", "srste@winning-init", "wanda@winning-init"):
        assert plans[slot].arm is None and plans[slot].sweep is None
        assert plan.runs_left(plans[slot], GRID, seeds, results) == 4  # 2 sweep runs + 2 more seeds
    assert not any(k[0].startswith(("srste", "wanda")) or "adapters" in k[0]
                   for k in plan.pending(arms, GRID, seeds, results))
    # dense 2 seeds, dense-init0.71 5, slope 2 seeds, slope-init0.71 5, dense-half 4, 3 slots x 4
    assert plan.remaining(arms, GRID, seeds, results) == 2 + 5 + 2 + 5 + 4 + 3 * 4
    results.update(sweep("slope-init0.71", (4.9, 4.8, 5.0)))  # now the winner is known: still 4 runs each
    plans = {p.entry: p for p in plan.resolve(arms, GRID, seeds, results)}
    assert plans["srste@winning-init"].arm == "srste-init0.71"
    assert plan.runs_left(plans["srste@winning-init"], GRID, seeds, results) == 4


def test_the_8m_study_plans_at_most_36_runs_and_keeps_its_settings(acc, plan, tmp_path):
    scale = plan.SCALES["8m"]
    assert scale.arms == plan.STUDY
    assert plan.planned(scale.arms, scale.lrs, scale.seeds) == 4 * 5 + 4 * 4 == 36
    # the dropped controls stay runnable by name, as heads with the whole grid
    assert plan.planned(("dense-init0.93", "dense-noclip", "slope-nodp"), scale.lrs, scale.seeds) == 15
    # a run recorded with the 8m study's original settings still belongs to the study (run name and
    # settings unchanged), and --estimate prints the planned total
    runs = tmp_path / "runs"
    runs.mkdir()
    old = {**record("dense", 1e-3, 0, 5.0), "settings": SETTINGS_8M}
    (runs / "dense-lr0.001-seed0.json").write_text(json.dumps(old))
    assert plan.run_name("dense-init0.71", 1e-3, 0) == "dense-init0.71-lr0.001-seed0"
    done = subprocess.run([sys.executable, str(BENCH / "accuracy.py"), "--scale", "8m", "--estimate",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "36 runs planned (4 heads x 5 + 4 followers x 4), 1 finished, 35 left" in done.stdout
    # dense-half is half the 8m model's 8 blocks, at the fair baseline's init
    command = acc.train_command(SETTINGS_8M, "dense-half", 2e-3, 1, tmp_path / "run")
    assert "--model.num_layers=4" in command and "--model.linear_init_scale=0.7071" in command
    assert command[command.index("--method") + 1] == "dense"


def test_every_arm_trains_at_the_init_scale_its_name_says_whatever_the_methods_default(acc, plan, tmp_path):
    """Each arm's command, read by slope's own config parser: an arm keeps its meaning when a method's default
    init scale changes (dense's did, by the study's own verdict), and finished runs stay comparable."""
    from slope.train import runconfig

    for arm in plan.ARMS:
        command = acc.train_command(SETTINGS_8M, arm, 2e-3, 0, tmp_path / "run")
        overrides = [a for a in command if a.startswith("--") and "=" in a]
        cfg = runconfig.resolve(None, [*overrides, f"--method.name={command[command.index('--method') + 1]}"])
        expected = 0.7071 if "init0.71" in arm or arm == "dense-half" else 0.93 if "init0.93" in arm else 1.0
        assert cfg.model.linear_init_scale == expected, arm


def test_deltas_against_the_fair_dense_baseline_and_dense_half_match_hand_arithmetic(rep):
    seeds = (0, 1, 2)
    bpb = {"dense-init0.71": (2.0, 2.1, 2.3), "dense-half": (2.4, 2.5, 2.9), "slope": (2.0, 2.2, 2.6),
           "dense": (9.0, 9.0, 9.0)}  # default-init dense is not the reference
    results = {(arm, 1e-3, s): record(arm, 1e-3, s, 5.0, sh_bpb=b, milton_bpb=b + 1)
               for arm, values in bpb.items() for s, b in zip(seeds, values, strict=True)}
    rows = {r["arm"]: r for r in rep.aggregate(("dense", "dense-init0.71", "slope", "dense-half"), (1e-3,),
                                                seeds, results)}
    slope = rows["slope"]
    assert slope["fair_dense"] == "dense-init0.71"
    # slope mean 2.266667, std 0.305505 (var 0.093333); dense-init0.71 mean 2.133333, var 0.023333;
    # Δ = 0.133333, s.e. sqrt(0.093333 / 3 + 0.023333 / 3) = 0.197203
    d = slope["shakespeare-heldout_bpb_vs_fair_dense"]
    assert d["diff"] == pytest.approx(0.133333, abs=1e-6) and d["se"] == pytest.approx(0.197203, abs=1e-6)
    # dense-half: mean 2.6; deviations -0.2, -0.1, 0.3; squares 0.04 + 0.01 + 0.09 = 0.14; / 2 = 0.07
    # slope - dense-half = 2.266667 - 2.6 = -0.333333; s.e. sqrt(0.093333 / 3 + 0.07 / 3) = sqrt(0.054444) = 0.233333
    h = slope["shakespeare-heldout_bpb_vs_dense_half"]
    assert h["diff"] == pytest.approx(-0.333333, abs=1e-6) and h["se"] == pytest.approx(0.233333, abs=1e-6)
    # Milton is bpb + 1 everywhere: the same differences
    assert slope["milton_bpb_vs_fair_dense"]["diff"] == pytest.approx(0.133333, abs=1e-6)
    # dense-half against the fair baseline: 2.6 - 2.133333 = 0.466667, s.e. sqrt(0.07 / 3 + 0.023333 / 3) = 0.176383
    assert rows["dense-half"]["shakespeare-heldout_bpb_vs_fair_dense"]["diff"] == pytest.approx(0.466667, abs=1e-6)
    assert rows["dense-half"]["shakespeare-heldout_bpb_vs_fair_dense"]["se"] == pytest.approx(0.176383, abs=1e-6)
    assert rows["dense-half"]["shakespeare-heldout_bpb_vs_dense_half"] is None
    assert rows["dense-init0.71"]["shakespeare-heldout_bpb_vs_fair_dense"] is None


def test_the_reproduction_check_compares_to_the_last_digit_given(rep):
    assert [c["reproduced"] for c in rep.reproduction({})] == [None, None]  # not run yet
    # expected 4.854 / 134.4 / 714: 4.85345 is the study's real value, a hand rounding of 4.8535 away
    good = record("slope", 2e-3, 0, val_loss=4.85345)
    good["eval"]["shakespeare-heldout"]["ppl"], good["eval"]["milton"]["ppl"] = 134.42, 713.1
    off = record("slope-init0.71", 2e-3, 0, val_loss=4.8127)
    off["eval"]["shakespeare-heldout"]["ppl"], off["eval"]["milton"]["ppl"] = 129.06, 697.2  # 0.16 from 128.9
    slope, init = rep.reproduction({("slope", 2e-3, 0): good, ("slope-init0.71", 2e-3, 0): off})
    assert slope["reproduced"] is True and slope["got"] == {
        "val_loss": "4.8534", "shakespeare-heldout_ppl": "134.42", "milton_ppl": "713.1"}
    assert init["reproduced"] is False and init["got"]["shakespeare-heldout_ppl"] == "129.06"
    # more than one unit of the last digit off, each value on its own: not the same run
    for key, value in (("val", 4.8528), ("shakespeare-heldout", 134.51), ("milton", 715.2)):
        near = json.loads(json.dumps(good))
        if key == "val":
            near["val_loss"] = value
        else:
            near["eval"][key]["ppl"] = value
        assert rep.reproduction({("slope", 2e-3, 0): near})[0]["reproduced"] is False, key


SLOPE_BPB = (2.0, 2.1, 2.3)  # mean 2.133333, sample variance 0.023333


def _init_question(rep, init_bpb, milton_shift=0.0, seeds=(0, 1, 2)):
    """The study's verdict on slope-init0.71 against slope, whose held-out bpb are SLOPE_BPB; Milton is the
    Shakespeare bpb + 1 for both, plus `milton_shift` for slope-init0.71."""
    results = {("slope", 1e-3, s): record("slope", 1e-3, s, 5.0, sh_bpb=b, milton_bpb=b + 1)
               for s, b in enumerate(SLOPE_BPB)}
    results |= {("slope-init0.71", 1e-3, s): record("slope-init0.71", 1e-3, s, 5.0, sh_bpb=b,
                                                    milton_bpb=b + 1 + milton_shift)
                for s, b in enumerate(init_bpb)}
    rows = rep.aggregate(("slope", "slope-init0.71"), (1e-3,), seeds, results)
    (answer,) = rep.default_questions(rows, winner=None, n_seeds=len(seeds))
    assert (answer["current"], answer["candidate"]) == ("slope", "slope-init0.71")
    return answer


@pytest.mark.parametrize("shift, milton_shift, verdict", [
    # the same spread as slope's: Δ = shift, s.e. sqrt(2 * 0.023333 / 3) = 0.124722, two s.e. 0.249444
    (-0.40, 0.0, "adopt"),
    (-0.25, 0.0, "adopt"),   # just beyond two s.e.
    (-0.24, 0.0, "keep"),    # just within
    (+0.40, 0.0, "worse"),
    (-0.40, +0.65, "keep"),  # better on Shakespeare, but Milton worse by 0.25 > two s.e.: the guard holds it
    (-0.40, +0.64, "adopt"),  # Milton worse by 0.24, within two s.e.
])
def test_a_default_changes_only_beyond_two_standard_errors(rep, shift, milton_shift, verdict):
    answer = _init_question(rep, [b + shift for b in SLOPE_BPB], milton_shift)
    assert answer["primary"]["diff"] == pytest.approx(shift, abs=1e-9)
    assert answer["primary"]["se"] == pytest.approx(0.124722, abs=1e-6)
    assert answer["guard"]["diff"] == pytest.approx(shift + milton_shift, abs=1e-9)
    assert answer["verdict"] == verdict and answer["seeds"] == 3


def test_a_default_waits_for_every_seed(rep):
    far_better = [b - 1.0 for b in SLOPE_BPB]
    for done in (1, 2):  # with 2 seeds a standard error exists, but the study's 3 are not in
        answer = _init_question(rep, far_better[:done])
        assert answer["verdict"] == "undecided" and answer["seeds"] == done
    assert _init_question(rep, far_better)["verdict"] == "adopt"


def test_the_report_answers_the_adapter_question_at_the_winning_init(acc, rep, tmp_path):
    arms = ("dense", "dense-init0.71", "slope", "slope-init0.71", "adapters0.9@winning-init")
    seeds, results = (0, 1, 2), {}
    for s, b in enumerate(SLOPE_BPB):
        # dense asks its own init question: here the smaller init is worse, by 0.3 on both sets
        results[("dense", 1e-3, s)] = record("dense", 1e-3, s, 5.0, sh_bpb=b, milton_bpb=b + 1)
        results[("dense-init0.71", 1e-3, s)] = record("dense-init0.71", 1e-3, s, 5.0, sh_bpb=b + 0.3,
                                                      milton_bpb=b + 1.3)
        # slope-init0.71 wins the contest by validation loss; its adapter arm is far better on both sets
        results[("slope", 1e-3, s)] = record("slope", 1e-3, s, 5.0, sh_bpb=b + 0.5, milton_bpb=b + 1.5)
        results[("slope-init0.71", 1e-3, s)] = record("slope-init0.71", 1e-3, s, 4.9, sh_bpb=b, milton_bpb=b + 1)
        results[("slope-init0.71-adapters0.9", 1e-3, s)] = record(
            "slope-init0.71-adapters0.9", 1e-3, s, 4.9, sh_bpb=b - 0.4, milton_bpb=b + 0.6)
    settings = {**SETTINGS, "scale": "8m"}
    rep.write_report("8m", arms, (1e-3,), seeds, settings, results, tmp_path / "runs", tmp_path)
    report = json.loads((tmp_path / "accuracy_8m.json").read_text())
    assert report["metrics"]["default_slope-init0.71_over_slope"] == "adopt"  # Δ -0.5, two s.e. 0.249444
    assert report["metrics"]["default_slope-init0.71-adapters0.9_over_slope-init0.71"] == "adopt"
    assert report["metrics"]["default_dense-init0.71_over_dense"] == "worse"
    assert "default_slope-adapters0.9_over_slope" not in report["metrics"]
    text = (tmp_path / "accuracy_8m.md").read_text()
    assert "## Defaults by evidence" in text
    assert ("| slope.adapter_start 0.99 -> 0.9 | slope-init0.71 | slope-init0.71-adapters0.9 | 3/3 "
            "| -0.4000 ± 0.1247 | -0.4000 ± 0.1247 | **better beyond 2 s.e.: becomes the default** |") in text


# validation-loss offsets by LR: the best is 2e-3, inside the grid
INTERIOR = {1e-3: 0.03, 2e-3: 0.0, 4e-3: 0.05}
# dense-init0.71's and dense-half's best is the grid's lowest LR, and below it 5e-4 is better still; 2.5e-4 is
# worse: dense-init0.71 sweeps 2.5e-4 and 5e-4 too and chooses 5e-4; dense-half then follows 5e-4 and its
# neighbour 1e-3 (lower loss than 2.5e-4), finds 5e-4 at the grid's edge again and adds 2.5e-4
EDGE = {2.5e-4: 0.02, 5e-4: -0.01, 1e-3: 0.0, 2e-3: 0.03, 4e-3: 0.05}
EDGE_SWEEPS = {"dense-init0.71": (2.5e-4, 5e-4, *GRID), "dense-half": (2.5e-4, 5e-4, 1e-3)}


def _fake_study(acc, plan, tmp_path, jobs, slow=None, edge=False):
    """The whole 8m study with a fake runner that checks, as each run starts, that what it depends on has
    finished and been saved; returns (results, the most runs seen at once). The run `slow` (arm, lr) takes
    0.5 s, the others 0.02 s, so with 2 jobs the other runs overtake it: a scheduler that started a run
    depending on it early would do it then. With `edge`, dense-init0.71 and dense-half get EDGE's losses."""
    runs_dir = tmp_path / f"jobs{jobs}-{slow}-{edge}" / "runs"
    started, lock, live = set(), threading.Lock(), [0, 0]
    # validation losses that make slope-init0.71 win and put dense-init0.71's best at 2e-3 (without `edge`)
    base = {"dense": 5.0, "dense-init0.71": 4.9, "slope": 4.95, "slope-init0.71": 4.85}
    sweeps = {"dense-init0.71": GRID, "dense-half": (1e-3, 2e-3)}  # the follower's: its head's best + 1e-3
    if edge:
        sweeps = EDGE_SWEEPS

    def saved(arm, lr, seed):
        return (runs_dir / f"{plan.run_name(arm, lr, seed)}.json").exists()

    def runner(settings, arm, lr, seed, work, threads=None, device=None):
        with lock:
            assert (arm, lr, seed) not in started, "a run was started twice"
            started.add((arm, lr, seed))
            live[0] += 1
            live[1] = max(live)
        head = plan.FOLLOWS.get(arm)
        if head:
            assert all(saved(head, x, 0) for x in sweeps.get(head, GRID)), f"{arm} started before {head}'s sweep"
        if arm in ("srste-init0.71", "wanda-init0.71", "slope-init0.71-adapters0.9"):
            assert all(saved(c, x, 0) for c in ("slope", "slope-init0.71") for x in GRID), "before the contest"
        if seed != 0:  # its whole sweep: the grid (and beyond) for a head, 2 LRs (and beyond) for a follower
            swept = sweeps.get(arm, (1e-3, 2e-3) if head else GRID)
            assert all(saved(arm, x, 0) for x in swept), f"{arm} seed {seed} started before its sweep finished"
        time.sleep(0.5 if (arm, lr) == slow else 0.02)
        with lock:
            live[0] -= 1
        offsets = EDGE if edge and arm in EDGE_SWEEPS else INTERIOR
        loss = base.get(arm, 5.1) + offsets[lr] + 0.001 * seed
        return {k: v for k, v in record(arm, lr, seed, val_loss=loss).items()
                if k not in ("arm", "method", "lr", "seed", "settings")}

    results = acc.run_study(plan.STUDY, GRID, (0, 1, 2), SETTINGS, runs_dir, tmp_path / "work", runner=runner,
                            threads=1, jobs=jobs)
    return results, live[1]


def test_jobs_2_finishes_the_same_runs_as_jobs_1_in_dependency_order(acc, plan, tmp_path):
    one, most_one = _fake_study(acc, plan, tmp_path, jobs=1)
    assert most_one == 1 and len(one) == 36
    # slow: the end of dense-half's head's sweep, then of the losing and of the winning contestant's sweep
    for slow in (("dense-init0.71", 4e-3), ("slope", 4e-3), ("slope-init0.71", 4e-3)):
        two, most_two = _fake_study(acc, plan, tmp_path, jobs=2, slow=slow)
        assert most_two == 2 and set(two) == set(one)
    assert {k[0] for k in one} == {"dense", "dense-init0.71", "slope", "slope-init0.71", "dense-half",
                                  "slope-init0.71-adapters0.9", "srste-init0.71", "wanda-init0.71"}
    assert plan.remaining(plan.STUDY, GRID, (0, 1, 2), two) == 0


def test_a_sweep_extended_past_the_grids_edge_finishes_before_its_seeds_and_followers(acc, plan, rep,
                                                                                      tmp_path):
    one, _ = _fake_study(acc, plan, tmp_path, jobs=1, edge=True)
    plain, _ = _fake_study(acc, plan, tmp_path, jobs=1)
    # against the interior study (both best at 2e-3): dense-init0.71 adds 2.5e-4 and 5e-4 and runs its seeds at
    # 5e-4; dense-half sweeps 2.5e-4, 5e-4, 1e-3 in place of 1e-3, 2e-3 and runs its seeds at 5e-4
    added = {("dense-init0.71", 2.5e-4, 0), ("dense-init0.71", 5e-4, 0), ("dense-init0.71", 5e-4, 1),
             ("dense-init0.71", 5e-4, 2), ("dense-half", 2.5e-4, 0), ("dense-half", 5e-4, 0),
             ("dense-half", 5e-4, 1), ("dense-half", 5e-4, 2)}
    gone = {("dense-init0.71", 2e-3, 1), ("dense-init0.71", 2e-3, 2), ("dense-half", 2e-3, 0),
            ("dense-half", 2e-3, 1), ("dense-half", 2e-3, 2)}
    assert set(one) == (set(plain) - gone) | added and len(one) == 39
    for slow in (("dense-init0.71", 5e-4), ("dense-init0.71", 2.5e-4), ("dense-half", 5e-4)):
        two, most_two = _fake_study(acc, plan, tmp_path, jobs=2, slow=slow, edge=True)
        assert most_two == 2 and set(two) == set(one)
    rows = {r["arm"]: r for r in rep.aggregate(plan.STUDY, GRID, (0, 1, 2), one)}
    assert rows["dense-init0.71"]["lr"] == 5e-4 and not rows["dense-init0.71"]["lr_at_edge"]
    assert rows["dense-half"]["lr"] == 5e-4 and rows["dense-half"]["sweep_lrs"] == [2.5e-4, 5e-4, 1e-3]
    # 2 added to dense-init0.71's grid, 1 to dense-half's 2 (its 5e-4 is one of its 2): 36 + 3 = 39 runs
    assert plan.beyond_grid(plan.STUDY, GRID, (0, 1, 2), one) == 3 and plan.remaining(plan.STUDY, GRID, (0, 1, 2), one) == 0
    assert plan.planned(plan.STUDY, GRID, (0, 1, 2)) + 3 == plan.finished(plan.STUDY, GRID, (0, 1, 2), one) == 39


def test_threads_are_recorded_and_passed_to_each_run(acc, tmp_path, monkeypatch, diverging_runs):
    assert acc.run_env(3, base={"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert acc.default_threads() == 3
    runs_dir = tmp_path / "runs"
    acc.run_study(("dense",), (1e-3,), (0,), SETTINGS, runs_dir, tmp_path / "work", threads=2)
    (seen,) = diverging_runs
    assert seen["env"]["OMP_NUM_THREADS"] == "2" and seen["env"]["MKL_NUM_THREADS"] == "2"
    # and to slope itself, whose run.threads = auto would take fewer threads on a machine that looks busy
    assert "--run.threads=2" in seen["command"]
    saved = json.loads((runs_dir / "dense-lr0.001-seed0.json").read_text())
    assert saved["status"] == "diverged" and saved["threads"] == 2 and saved["settings"] == SETTINGS


def test_a_failed_run_stops_the_study_once_the_runs_in_progress_are_saved(acc, plan, tmp_path):
    def runner(settings, arm, lr, seed, work, threads=None, device=None):
        if lr == 1e-3:
            raise plan.StudyError("run failed")
        time.sleep(0.2)  # still running when its neighbour fails
        return {k: v for k, v in record(arm, lr, seed, val_loss=5.0).items()
                if k not in ("arm", "method", "lr", "seed", "settings")}

    with pytest.raises(plan.StudyError, match="run failed"):
        acc.run_study(("dense",), GRID, (0,), SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner, jobs=2)
    # the run in progress was saved; nothing was started after the failure
    assert [p.name for p in (tmp_path / "runs").glob("*.json")] == ["dense-lr0.002-seed0.json"]


def test_a_study_stopped_by_a_signal_ends_the_runs_in_progress(acc, plan, tmp_path):
    """SIGTERM or Ctrl-C reaches the main thread, not the threads waiting on the runs: the study must end
    the `slope train` processes itself (here `sleep`), rather than leave them training as orphans."""
    procs = []

    def runner(settings, arm, lr, seed, work, threads=None, device=None):
        if lr == 2e-3:  # a long run, registered like train_run's
            proc = subprocess.Popen(["sleep", "30"])
            procs.append(proc)
            with acc._LIVE_LOCK:
                acc._LIVE.add(proc)
            try:
                proc.wait()
            finally:
                with acc._LIVE_LOCK:
                    acc._LIVE.discard(proc)
            raise plan.StudyError("killed")
        time.sleep(0.3)
        return {k: v for k, v in record(arm, lr, seed, val_loss=5.0).items()
                if k not in ("arm", "method", "lr", "seed", "settings")}

    def stop(results):  # the signal arrives in the main thread once the short run is saved
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        acc.run_study(("dense",), GRID, (0,), SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner,
                      after_each=stop, jobs=2)
    assert time.monotonic() - start < 10 and procs and procs[0].poll() is not None


@pytest.mark.parametrize("losses, beyond, chosen, at_edge", [
    ((4.8, 4.9, 5.0, {5e-4: 4.85}), (5e-4,), 1e-3, False),  # below the edge is worse: 1e-3 stands, inside
    ((4.8, 4.9, 5.0, {5e-4: 4.7, 2.5e-4: 4.6}), (5e-4, 2.5e-4), 2.5e-4, True),  # still falling: stops at 2
    ((5.0, 4.9, 4.8, {8e-3: 4.9}), (8e-3,), 4e-3, False),  # the high edge: doubled
    ((5.0, 4.9, 4.8, {8e-3: "diverged"}), (8e-3,), 4e-3, False),  # a diverged extension counts as worst
])
def test_a_head_whose_best_lr_is_the_grids_edge_sweeps_past_it_before_its_seeds(plan, rep, losses, beyond,
                                                                                  chosen, at_edge):
    *grid_losses, extra = losses
    arms, seeds = ("dense-init0.71", "dense-half"), (0, 1, 2)
    results = sweep("dense-init0.71", grid_losses)
    for i, lr in enumerate(beyond):  # the extension appears once the runs before it have finished
        (head, follower) = plan.resolve(arms, GRID, seeds, results)
        assert head.sweep == tuple(sorted((*GRID, *beyond[:i + 1])))
        assert plan.plan_lr(head, seeds, results) is None and follower.sweep is None  # nothing chosen yet
        assert plan.pending(arms, GRID, seeds, results) == [("dense-init0.71", lr, 0)]  # no seed, no follower
        value = extra[lr]
        results[("dense-init0.71", lr, 0)] = record("dense-init0.71", lr, 0, val_loss=None if value == "diverged"
                                                   else value, status="diverged" if value == "diverged" else "ok")
    (head, follower) = plan.resolve(arms, GRID, seeds, results)
    assert head.sweep == tuple(sorted((*GRID, *beyond)))  # settled: no further point
    assert plan.plan_lr(head, seeds, results) == chosen
    assert [k for k in plan.pending(arms, GRID, seeds, results) if k[0] == "dense-init0.71"] == [
        ("dense-init0.71", chosen, 1), ("dense-init0.71", chosen, 2)]
    assert rep.aggregate(arms, GRID, seeds, results)[0]["lr_at_edge"] is at_edge
    # the follower's neighbours come from the whole sweep: 1e-3's are 5e-4 (4.85) and 2e-3 (4.9)
    if losses[3] == {5e-4: 4.85}:
        assert follower.sweep == (5e-4, 1e-3)


def test_a_follower_extends_only_past_the_grids_edge_never_inside_it(plan):
    arms, seeds = ("slope-init0.71", "srste-init0.71"), (0, 1, 2)
    results = sweep("slope-init0.71", (4.9, 4.8, 4.95))  # best 2e-3, neighbour 1e-3
    # the follower's best, 1e-3, is the grid's edge: 5e-4 is added; its seeds wait for it
    results.update({("srste-init0.71", 1e-3, 0): record("srste-init0.71", 1e-3, 0, val_loss=5.0),
                    ("srste-init0.71", 2e-3, 0): record("srste-init0.71", 2e-3, 0, val_loss=5.1)})
    assert plan.pending(arms, GRID, seeds, results)[-3:] == [
        ("srste-init0.71", 5e-4, 0), ("slope-init0.71", 2e-3, 1), ("slope-init0.71", 2e-3, 2)]
    # its best 2e-3 is the larger of its two LRs but inside the grid: no 4e-3, the seeds run at 2e-3
    results[("srste-init0.71", 2e-3, 0)]["val_loss"] = 4.9
    assert [k for k in plan.pending(arms, GRID, seeds, results) if k[0] == "srste-init0.71"] == [
        ("srste-init0.71", 2e-3, 1), ("srste-init0.71", 2e-3, 2)]
    # a one-LR grid has no edge to pass
    assert plan.extend_sweep("dense", (1e-3,), (1e-3,), 0, {("dense", 1e-3, 0): record("dense", 1e-3, 0, 5.0)}) == (1e-3,)


def test_the_slope_init_contest_waits_for_a_sweep_extended_past_the_grids_edge(plan, rep):
    # slope's best is 4.85 inside the grid; slope-init0.71's is 4.88 at 1e-3, the grid's edge: 5e-4 is due
    results = {**sweep("slope", (4.9, 4.85, 5.0)), **sweep("slope-init0.71", (4.88, 4.9, 5.0))}
    contest = ("slope", "slope-init0.71")
    assert plan.init_winner(contest, GRID, 0, results) == (False, None)
    arms = (*contest, "srste@winning-init")
    assert not any(k[0].startswith("srste") for k in plan.pending(arms, GRID, (0, 1, 2), results))
    # below the edge slope-init0.71 reaches 4.8 and wins, though by the grid alone it would have lost
    results[("slope-init0.71", 5e-4, 0)] = record("slope-init0.71", 5e-4, 0, val_loss=4.8)
    results[("slope-init0.71", 2.5e-4, 0)] = record("slope-init0.71", 2.5e-4, 0, val_loss=4.9)
    assert plan.init_winner(contest, GRID, 0, results) == (True, "slope-init0.71")
    assert "slope-init0.71 4.8000 at lr 0.0005" in rep.contest_text(arms, GRID, (0, 1, 2), results)


def test_the_time_estimate_projects_the_typical_step_not_a_pause(acc):
    arms, lrs, seeds = ("dense",), GRID, (0, 1, 2)
    results = sweep("dense", (4.9, 4.8, 5.0))  # best inside the grid: 2 seeds left
    # one run suspended for an hour: 800 steps at a median of 2 s, plus 100 s outside the loop = 1,700 s
    paused = {"median_step_seconds": 2.0, "steps": 800, "train_seconds": 5200.0, "run_wall_seconds": 5300.0,
              "wall_seconds": 5310.0}
    assert acc.typical_seconds({**results[("dense", 1e-3, 0)], **paused}) == pytest.approx(1700.0)
    for lr in GRID:
        results[("dense", lr, 0)] = {**results[("dense", lr, 0)], **paused}
    assert acc.estimate(arms, lrs, seeds, results, jobs=2) == (2, pytest.approx(2 * 1700.0 / 2))
    # a run recorded before step times were kept may hold a pause: it counts only when no run has step times
    del results[("dense", 1e-3, 0)]["median_step_seconds"]
    del results[("dense", 2e-3, 0)]["median_step_seconds"]
    assert acc.estimate(arms, lrs, seeds, results) == (2, pytest.approx(2 * 1700.0))
    del results[("dense", 4e-3, 0)]["median_step_seconds"]
    assert acc.estimate(arms, lrs, seeds, results) == (2, pytest.approx(2 * 5310.0))


def test_a_scale_with_no_finished_run_projects_its_time_from_the_8m_runs(acc, plan, tmp_path):
    # by hand, 8m: matrices 8 x (4 x 256^2 + 3 x 256 x 688) + 8192 x 256 = 8,421,376 weights, x 6 = 50,528,256,
    # attention 12 x 8 x 256 x 256 = 6,291,456: 56,819,712. 30m: 8 x (4 x 512^2 + 3 x 512 x 1376) + 8192 x 512
    # = 29,491,200 weights, x 6 = 176,947,200, attention 12,582,912: 189,530,112
    assert plan.train_flops_per_token(256, 8, 688) == 56_819_712
    assert plan.train_flops_per_token(512, 8, 1376) == 189_530_112
    runs = tmp_path / "8m-runs"
    runs.mkdir()
    for i, seconds in enumerate((900.0, 1000.0, 5000.0)):  # median 1,000 s
        rec = {**record("dense", 1e-3, i, 5.0), "settings": SETTINGS_8M, "wall_seconds": seconds}
        (runs / f"dense-lr0.001-seed{i}.json").write_text(json.dumps(rec))
    seconds, ratio = acc.projected_seconds("30m", 36, 2, runs)
    assert ratio == pytest.approx(189_530_112 / 56_819_712)
    assert seconds == pytest.approx(36 * 1000.0 * ratio / 2)
    assert acc.projected_seconds("8m", 36, 2, runs) is None  # 8m has no smaller scale to project from
    assert acc.projected_seconds("30m", 36, 2, tmp_path / "none") is None
    # the command line: a 30m study with nothing finished quotes the projection from the committed 8m runs
    done = subprocess.run([sys.executable, str(BENCH / "accuracy.py"), "--scale", "30m", "--estimate",
                           "--out", str(tmp_path / "30m")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 finished, 36 left (about " in done.stdout and "projected from the 8m runs' typical time x 3.34" in done.stdout


@pytest.mark.parametrize("flag, device", [([], "cpu"), (["--device", "cuda"], "cuda")])
def test_the_device_reaches_every_run_and_a_cpu_scale_trains_in_float32_on_either(acc, plan, tmp_path, monkeypatch,
                                                                                   diverging_runs, flag, device):
    monkeypatch.setattr(acc.signal, "signal", lambda *args: None)  # main's SIGTERM handler stays out of pytest
    acc.main(["--scale", "8m", *flag, "--arms", "dense", "--lrs", "1e-3", "--seeds", "0", "--threads", "1",
              "--out", str(tmp_path / "out"), "--work", str(tmp_path), "--report-dir", str(tmp_path)])
    (command,) = [run["command"] for run in diverging_runs]
    assert f"--run.device={device}" in command and "--run.precision=fp32" in command
    # GPT-2 small trains on a GPU at its config's precision
    gpt2 = {**SETTINGS_8M, "scale": "gpt2-small", "config": "gpu-gpt2-small"}
    command = acc.train_command(gpt2, "slope", 6e-4, 0, tmp_path / "run", plan.SCALES["gpt2-small"].device)
    assert "--run.device=cuda" in command and not any(c.startswith("--run.precision") for c in command)
