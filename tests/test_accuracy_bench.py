"""benchmarks/accuracy.py: LR selection by validation only, the seed statistics, resume, missing runs, and
one real tiny run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _benchmarks import BENCH, benchmark_module

SETTINGS = {"scale": "test", "config": "tiny", "model": [], "steps": 2, "train_data": "shakespeare",
            "eval_every": 1, "extra": [], "warmup": []}


@pytest.fixture(scope="module")
def acc():
    with benchmark_module("accuracy") as module:
        yield module


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


def test_lr_is_chosen_by_validation_loss_never_by_a_test_set(acc):
    # lr 2e-3 has the lowest validation loss; Milton (and Shakespeare) would pick 1e-3
    results = {
        ("dense", 1e-3, 0): record("dense", 1e-3, 0, val_loss=5.0, sh_bpb=2.0, milton_bpb=3.0, milton_ppl=500.0),
        ("dense", 2e-3, 0): record("dense", 2e-3, 0, val_loss=4.8, sh_bpb=2.4, milton_bpb=3.4, milton_ppl=900.0),
        ("dense", 4e-3, 0): record("dense", 4e-3, 0, val_loss=4.9, sh_bpb=2.2, milton_bpb=3.2, milton_ppl=700.0),
    }
    assert acc.choose_lr("dense", (1e-3, 2e-3, 4e-3), 0, results) == 2e-3
    (row,) = acc.aggregate(("dense",), (1e-3, 2e-3, 4e-3), (0,), results)
    assert row["lr"] == 2e-3 and not row["lr_at_edge"]
    assert row["milton_ppl"]["mean"] == 900.0  # reported at the chosen LR, whatever the test sets say
    # the seeds after the sweep run at the chosen LR
    assert acc.pending(("dense",), (1e-3, 2e-3, 4e-3), (0, 1), results) == [("dense", 2e-3, 1)]


def test_lr_selection_waits_for_the_whole_sweep_and_skips_diverged_lrs(acc):
    lrs = (1e-3, 2e-3)
    partial = {("slope", 1e-3, 0): record("slope", 1e-3, 0, val_loss=5.0)}
    assert acc.choose_lr("slope", lrs, 0, partial) is None
    diverged = {**partial, ("slope", 2e-3, 0): record("slope", 2e-3, 0, val_loss=None, status="diverged")}
    assert acc.choose_lr("slope", lrs, 0, diverged) == 1e-3


def test_seed_statistics_match_hand_arithmetic(acc):
    lrs, seeds = (1e-3,), (0, 1, 2)
    results = {}
    for seed, (dense_bpb, slope_bpb) in enumerate([(2.0, 2.0), (2.1, 2.2), (2.3, 2.6)]):
        results[("dense", 1e-3, seed)] = record("dense", 1e-3, seed, 5.0, sh_bpb=dense_bpb)
        results[("slope", 1e-3, seed)] = record("slope", 1e-3, seed, 5.0, sh_bpb=slope_bpb)
    dense, sparse = acc.aggregate(("dense", "slope"), lrs, seeds, results)
    # slope: mean (2.0 + 2.2 + 2.6) / 3 = 2.266667; deviations -0.266667, -0.066667, 0.333333;
    # squares 0.071111 + 0.004444 + 0.111111 = 0.186667; / (3 - 1) = 0.093333; sqrt = 0.305505
    s = sparse["shakespeare-heldout_bpb"]
    assert s["mean"] == pytest.approx(2.266667, abs=1e-6)
    assert s["std"] == pytest.approx(0.305505, abs=1e-6)
    assert (s["min"], s["max"], s["n"]) == (2.0, 2.6, 3)
    # dense: mean 2.133333; squares 0.017778 + 0.001111 + 0.027778 = 0.046667; / 2 = 0.023333; sqrt = 0.152753
    assert dense["shakespeare-heldout_bpb"]["std"] == pytest.approx(0.152753, abs=1e-6)
    # difference 2.266667 - 2.133333 = 0.133333; s.e. sqrt(0.093333 / 3 + 0.023333 / 3) = sqrt(0.038889) = 0.197203
    d = sparse["shakespeare-heldout_bpb_vs_dense"]
    assert d["diff"] == pytest.approx(0.133333, abs=1e-6)
    assert d["se"] == pytest.approx(0.197203, abs=1e-6)
    one_seed = acc.stats([3.0])
    assert one_seed["mean"] == 3.0 and one_seed["std"] is None


def test_resume_skips_finished_runs(acc, tmp_path):
    arms, lrs, seeds = ("dense", "slope"), (1e-3, 2e-3), (0, 1, 2)
    calls, kill_at = [], [3]

    def runner(settings, arm, lr, seed, work):
        calls.append((arm, lr, seed))
        assert len(calls) <= 8, "the study trains runs that have finished"  # rather than loop for ever
        if len(calls) == kill_at[0]:
            raise KeyboardInterrupt  # the study is killed during this run
        return {k: v for k, v in record(arm, lr, seed, val_loss=5.0 - lr).items()
                if k not in ("arm", "method", "lr", "seed", "settings")}

    with pytest.raises(KeyboardInterrupt):
        acc.run_study(arms, lrs, seeds, SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2  # only the killed run is lost
    first = calls[:2]
    calls.clear()
    kill_at[0] = None
    results = acc.run_study(arms, lrs, seeds, SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner)
    assert not set(first) & set(calls)  # nothing finished is trained again
    # 2 arms x (2 sweep LRs + 2 more seeds at the chosen LR, 2e-3 by its lower validation loss)
    assert len(first) + len(calls) == 8 and len(results) == 8
    assert ("dense", 2e-3, 2) in results and ("dense", 1e-3, 2) not in results
    calls.clear()
    acc.run_study(arms, lrs, seeds, SETTINGS, tmp_path / "runs", tmp_path / "work", runner=runner)
    assert calls == []  # a finished study runs nothing


def test_results_of_other_settings_are_refused(acc, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "dense-lr0.001-seed0.json").write_text(json.dumps(record("dense", 1e-3, 0, 5.0)))
    with pytest.raises(acc.StudyError, match="other settings"):
        acc.load_results(runs, {**SETTINGS, "steps": 800})


def test_missing_runs_are_reported_as_missing(acc, tmp_path):
    arms, lrs, seeds = ("dense", "slope"), (1e-3, 2e-3), (0, 1)
    results = {  # dense: sweep done, seed 1 missing; slope: half its sweep
        ("dense", 1e-3, 0): record("dense", 1e-3, 0, 5.0),
        ("dense", 2e-3, 0): record("dense", 2e-3, 0, 4.0),
        ("slope", 1e-3, 0): record("slope", 1e-3, 0, 5.0),
    }
    dense, sparse = acc.aggregate(arms, lrs, seeds, results)
    assert dense["seeds_done"] == [0] and dense["seeds_missing"] == [1]
    assert dense["missing_runs"] == ["dense-lr0.002-seed1"]
    assert sparse["lr"] is None and sparse["shakespeare-heldout_bpb"] is None
    assert sparse["missing_runs"] == ["slope-lr0.002-seed0", "slope seed 1 (after the sweep)"]
    assert acc.remaining(arms, lrs, seeds, results) == 3
    path = acc.write_report("test", arms, lrs, seeds, SETTINGS, results, tmp_path / "runs", tmp_path)
    md = path.with_suffix(".md").read_text()
    assert "PARTIAL: 3 of 6 runs still missing" in md
    assert "slope-lr0.002-seed0" in md and "dense-lr0.002-seed1" in md
    assert json.loads(path.read_text())["metrics"]["runs_left"] == 3


def test_one_real_tiny_run_end_to_end(acc, tmp_path):
    """1 arm x 1 LR x 1 seed x 2 steps of the tiny config, through `slope train` in a subprocess."""
    command = [sys.executable, str(BENCH / "accuracy.py"), "--quick", "--arms", "dense", "--seeds", "0",
               "--steps", "2", "--work", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    study = tmp_path / "slope-accuracy-quick"
    saved = json.loads((study / "study" / "runs" / "dense-lr0.01-seed0.json").read_text())
    assert saved["status"] == "ok" and saved["settings"]["steps"] == 2
    assert set(saved["eval"]) == {"val", "shakespeare-heldout", "milton"}
    assert "--data.val=" in saved["command"] and "--data.val_fraction=0.05" in saved["command"]
    # the LR sweep compares the final loss on the training corpus' held-out split, nothing else
    assert saved["val_loss"] == saved["eval"]["val"]["loss"] == saved["val_curve"][-1][1]
    assert saved["val_curve"][-1][0] == 2 and saved["clip_rate"] is not None
    assert not (study / "dense-lr0.01-seed0").exists()  # the run directory is deleted once its JSON is saved
    report = json.loads((study / "study" / "accuracy_quick.json").read_text())
    assert report["metrics"]["runs_left"] == 0
    assert report["rows"][0]["milton_bpb"]["n"] == 1
