"""benchmarks/default_lr.py: each run is the default `slope train` with only its method, LR, seed and
threads changed (read back by slope's own CLI), the verdicts follow the study's rule, and finished runs are
not trained again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tomllib
from _benchmarks import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("default_lr") as module:
        yield module


def _print_config(command: list[str]) -> dict:
    out = subprocess.run([*command, "--print-config"], capture_output=True, text=True, check=True).stdout
    return tomllib.loads(out)


def test_each_run_is_the_default_run_with_only_its_method_lr_seed_and_threads_set(bench, tmp_path):
    """The exact command the benchmark starts, resolved by `slope train --print-config`, against the default
    run resolved the same way: nothing else may differ, or the LR it decides is not the default run's."""
    command = bench.train_command("dense", 2e-3, 1, tmp_path / "dense-lr0.002-seed1", 1, [])
    assert command[:4] == [sys.executable, "-m", "slope", "train"]
    got = _print_config(command)
    default = _print_config([sys.executable, "-m", "slope", "train", "--run-dir", str(tmp_path / "d")])
    assert got["optim"]["lr"] == 2e-3 and got["run"]["seed"] == 1 and got["run"]["threads"] == 1
    assert got["method"]["name"] == "dense" and default["method"]["name"] == "slope"
    assert default["optim"]["lr"] != 2e-3 and default["run"]["seed"] != 1  # so the checks above can fail
    for table in ("method", "optim", "run"):
        got[table] = {k: v for k, v in got[table].items() if k not in ("name", "lr", "seed", "threads")}
        default[table] = {k: v for k, v in default[table].items() if k not in ("name", "lr", "seed", "threads")}
    assert got == default


def _runs(values: dict) -> dict:
    """{(method, lr, seed): {set: bpb}} from {(method, lr): ([shakespeare per seed], [milton per seed])}."""
    return {(m, lr, s): {"shakespeare-heldout": sh, "milton": mi}
            for (m, lr), (shs, mis) in values.items() for s, (sh, mi) in enumerate(zip(shs, mis, strict=True))}


def test_verdicts_follow_the_studys_rule_with_hand_arithmetic(bench):
    runs = _runs({
        ("dense", 3e-3): ([2.50, 2.52, 2.54], [3.50, 3.52, 3.54]),
        ("dense", 2e-3): ([2.51, 2.53, 2.55], [3.50, 3.52, 3.54]),  # +0.01, se 0.0163: within two
        ("slope", 3e-3): ([2.58, 2.57, 2.59], [3.56, 3.55, 3.57]),
        ("slope", 2e-3): ([2.49, 2.50, 2.48], [3.44, 3.43, 3.45]),  # -0.09, se 0.00816: beyond two
        ("slope", 4e-3): ([2.68, 2.67, 2.69], [3.56, 3.55, 3.57]),  # +0.10: beyond two the wrong way
    })
    rows = [bench.aggregate(m, lr, [0, 1, 2], runs) for m, lr in
            (("dense", 3e-3), ("dense", 2e-3), ("slope", 3e-3), ("slope", 2e-3), ("slope", 4e-3))]
    answers = {(a["method"], a["change"]): a for a in bench.compare(rows, [3e-3, 2e-3, 4e-3], 3)}
    dense = answers[("dense", "optim.lr 0.003 -> 0.002")]
    assert dense["verdict"] == "keep"
    assert dense["primary"]["diff"] == pytest.approx(0.01, abs=1e-12)
    assert dense["primary"]["se"] == pytest.approx((2 * 0.02**2 / 3) ** 0.5, rel=1e-9)
    slope = answers[("slope", "optim.lr 0.003 -> 0.002")]
    assert slope["verdict"] == "adopt" and slope["primary"]["diff"] == pytest.approx(-0.09, abs=1e-12)
    assert answers[("slope", "optim.lr 0.003 -> 0.004")]["verdict"] == "worse"
    assert answers[("dense", "optim.lr 0.003 -> 0.004")]["verdict"] == "undecided"  # dense never ran 4e-3


def test_a_verdict_waits_for_every_seed(bench):
    runs = _runs({("slope", 3e-3): ([2.58, 2.57, 2.59], [3.5] * 3), ("slope", 2e-3): ([2.40, 2.41], [3.4] * 2)})
    rows = [bench.aggregate("slope", lr, [0, 1, 2], runs) for lr in (3e-3, 2e-3)]
    assert [a["verdict"] for a in bench.compare(rows, [3e-3, 2e-3], 3) if a["method"] == "slope"] == ["undecided"]


def test_finished_runs_are_not_trained_again_and_the_report_is_written(bench, tmp_path, monkeypatch):
    bpb = {("dense", 3e-3): 2.55, ("dense", 2e-3): 2.54, ("slope", 3e-3): 2.58, ("slope", 2e-3): 2.49}
    started = []

    def fake_run(command, directory, threads):  # writes what `slope train` would: summary.json
        started.append(directory.name)
        value_of = {a.split("=")[0]: a.split("=")[1] for a in command if a.startswith("--") and "=" in a}
        method, lr, seed = command[command.index("--method") + 1], float(value_of["--optim.lr"]), int(
            value_of["--run.seed"])
        directory.mkdir(parents=True)
        value = bpb[(method, lr)] + 0.001 * seed
        (directory / "summary.json").write_text(json.dumps(
            {"eval": {"shakespeare-heldout": {"bpb": value}, "milton": {"bpb": value + 1}}}))

    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(sys.modules["benchmarks._report"], "RESULTS", tmp_path / "results")
    runs_dir = tmp_path / "runs"
    fake_run(bench.train_command("slope", 2e-3, 1, runs_dir / "slope-lr0.002-seed1", 1, []),
             runs_dir / "slope-lr0.002-seed1", 1)  # finished before the benchmark starts
    started.clear()
    bench.main(["--runs-dir", str(runs_dir), "--jobs", "1"])
    assert len(started) == 11 and "slope-lr0.002-seed1" not in started
    report = (tmp_path / "results" / "default_lr.md").read_text()
    assert "| slope | 0.002 | 3 | 2.4910 ± 0.0010 | 3.4910 ± 0.0010 |" in report
    assert "| slope | optim.lr 0.003 -> 0.002 | -0.0900 ± 0.0008 | -0.0900 ± 0.0008 | adopt |" in report
    started.clear()
    bench.main(["--runs-dir", str(runs_dir), "--jobs", "2"])
    assert started == []  # a finished benchmark runs nothing
