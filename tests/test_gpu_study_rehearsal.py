"""benchmarks/gpu_study.sh rehearsed on this CPU (REHEARSAL=1: each scale's command line with --estimate,
then one 4-step run of the tiny model): the study's finished runs travel with it and the study there
accepts them, a run it finishes comes back, $OUT ends with its 2 files however the study ends, and the
documented command brings the runs home.
No test here times anything; the subprocess timeouts are only guards against a hung script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from _benchmarks import BENCH

SCRIPT = BENCH / "gpu_study.sh"
RUNS = BENCH / "results" / "accuracy" / "8m" / "runs"
GUARD_S = 240


def rehearse(out: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("JOBS", "T_STUDY", "OUT", "SCALES")}
    return subprocess.run(["bash", str(SCRIPT)], env={**clean, "REHEARSAL": "1", "OUT": str(out), "PY": sys.executable, **env},
                          capture_output=True, text=True, timeout=GUARD_S)


def test_the_study_runs_on_the_given_device_and_comes_back_in_two_files(tmp_path):
    out = tmp_path / "out"
    done = rehearse(out)
    log = (out / "study.log").read_text()
    assert done.returncode == 0, log + done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["study.log", "study.tar.gz"]
    with tarfile.open(out / "study.tar.gz") as tar:
        names = set(tar.getnames())
        # every committed 8m run travels with the study, byte for byte
        for path in RUNS.glob("*.json"):
            member = tar.extractfile(f"study/8m/runs/{path.name}")
            assert member is not None and member.read() == path.read_bytes()
        new = json.loads(tar.extractfile("study/quick/runs/dense-lr0.01-seed0.json").read())
    assert len(list(RUNS.glob("*.json"))) >= 16 and f"{len(list(RUNS.glob('*.json')))} finished 8m run(s)" in log
    assert new["status"] == "ok" and new["device"] == "cpu" and new["precision"] == "float32"
    assert "--run.device=cpu" in new["command"] and "--run.precision=fp32" in new["command"]
    assert "study/quick/accuracy_quick.md" in names
    # each scale's study read its copied runs (a settings mismatch would have failed it) on the given device
    for scale in ("8m", "30m"):
        assert f"accuracy.py --scale {scale} --device cpu --jobs 8 --out" in log
        assert f"accuracy study {scale}: 36 runs planned" in log
    # the documented command brings the runs home
    home = tmp_path / "benchmarks" / "results" / "accuracy" / "8m"
    home.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(out / "study.tar.gz"), "--strip-components=2", "-C", str(home),
                    "study/8m/runs"], check=True)
    assert sorted(p.name for p in (home / "runs").iterdir()) == sorted(p.name for p in RUNS.glob("*.json"))


def test_a_study_stopped_at_its_limit_keeps_what_it_had(tmp_path):
    out = tmp_path / "out"
    done = rehearse(out, T_STUDY="1")  # python cannot even start the run in a second
    log = (out / "study.log").read_text()
    assert done.returncode == 124, log + done.stderr
    assert "stopped at its limit of 1 s" in log
    assert sorted(p.name for p in out.iterdir()) == ["study.log", "study.tar.gz"]
    with tarfile.open(out / "study.tar.gz") as tar:
        assert {f"study/8m/runs/{p.name}" for p in RUNS.glob("*.json")} <= set(tar.getnames())


def test_bad_settings_are_refused_in_one_line(tmp_path):
    for name, value in (("JOBS", "0"), ("T_STUDY", "soon")):
        done = rehearse(tmp_path / name, **{name: value})
        assert done.returncode == 2
        assert done.stderr.strip() == f"gpu_study: {name}={value} is not a positive whole number"
    done = rehearse(tmp_path / "scales", SCALES="8m 125m")
    assert done.returncode == 2 and done.stderr.strip() == "gpu_study: SCALES holds 125m; the scales are 8m and 30m"
