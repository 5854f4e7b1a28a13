"""benchmarks/gpu_check.sh rehearsed on this CPU, and the CPU modes of the benchmarks it runs.

A GPU is lent for about 15 minutes; a check script that hangs, loses its results or writes no report
wastes the loan. So here, on a CPU (REHEARSAL=1: tiny shapes, the emulated 2:4 library):
  - every stage runs in order under its limit, a stage made to fail is named in report.md, a stage
    made to hang is stopped by its limit, and $OUT ends with at most 4 files, at most 2 folders deep;
  - SIGTERM and SIGINT still leave report.md and no stage process behind;
  - bad settings stop the script with one line naming the value, and report.md still says why;
and in this process: the benchmarks write their results after every row (a stage stopped by its
limit keeps what it finished), and prefill is tuned at the training token bucket.

The rehearsal gets tiny limits (T_ALL=2), so it takes about half a minute whatever this machine's
speed: the stages that need longer are stopped by their limit, which is plumbing under test too.
No test here times anything; the subprocess timeouts are only guards against a hung script.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from _benchmarks import BENCH, benchmark_module

SCRIPT = BENCH / "gpu_check.sh"
TEXT = SCRIPT.read_text()
STAGES = re.search(r"^ALL_STAGES=\((.*)\)$", TEXT, re.M).group(1).split()
KEPT = {"report.md", "log.txt", "tuning.json", "results.tar.gz"}  # what $OUT may hold at the end
GUARD_S = 240  # a hung script fails the test instead of hanging the suite


def env_for(out: Path, **overrides) -> dict:
    """The environment of a rehearsal into `out`: none of the caller's stage or tuning settings."""
    env = {k: v for k, v in os.environ.items()
           if not re.match(r"^(T_[A-Z_]+|STAGES|FAIL_STAGE|HANG_STAGE|SLOPE_TUNE_\w+|SLOPE_TUNING_CACHE)$", k)}
    env.update(REHEARSAL="1", OUT=str(out), PY=sys.executable, OMP_NUM_THREADS="1", **overrides)
    return env


def rehearse(out: Path, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], env=env_for(out, **overrides), capture_output=True, text=True,
                          timeout=GUARD_S, start_new_session=True)


def files_under(out: Path) -> list[Path]:
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())


def stage_row(report: str, stage: str) -> list[str]:
    """The cells of a stage's row in report.md's stage table."""
    row = re.search(rf"^\| \d+ \| {stage} \|.*$", report, re.M).group(0)
    return [cell.strip() for cell in row.strip("|").split("|")]


def log_section(log: str, stage: str) -> str:
    return re.search(rf"^=== \[\d+/\d+\] {stage}: .*?^--- {stage}: .*?$", log, re.M | re.S).group(0)


def processes_in_group(pgid: int) -> list[int]:
    """Live processes of a process group (read from /proc; nothing is signalled)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def process_groups(log: str) -> list[int]:
    return [int(g) for g in re.findall(r"^\(process group (\d+)\)$", log, re.M)]


# ---- the whole rehearsal ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One rehearsal of every stage with tiny limits, e2e made to fail and fsdp made to hang; the
    fused-kernel benchmark gets the time to finish, so there are result files to pack."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    done = rehearse(out, T_ALL="2", T_STEP="30", FAIL_STAGE="e2e", HANG_STAGE="fsdp")
    return out, done, (out / "report.md").read_text(), (out / "log.txt").read_text()


def test_the_rehearsal_runs_every_stage_in_order_and_reports(rehearsal):
    _, done, report, log = rehearsal
    assert done.returncode == 1, done.stdout[-2000:]  # a stage failed: the exit status says so
    headers = re.findall(r"^=== \[(\d+)/(\d+)\] (\w+): ", log, re.M)
    assert [h[2] for h in headers] == STAGES and {int(h[1]) for h in headers} == {len(STAGES)}
    for stage in STAGES:
        assert f"--- {stage}: " in log  # and every stage was recorded when it ended
        assert stage_row(report, stage)[4] != "not run"
    assert report.startswith("# CUDA 2:4 backend: CPU rehearsal of the GPU check")
    assert "skipped in rehearsal: nvidia-smi" in log
    outcome = re.search(r"^- outcome: .*$", report, re.M).group(0)
    assert outcome in done.stdout.split("report: ", 1)[1]  # the report is printed at the end too


def test_out_ends_with_at_most_four_files_and_two_folders_deep(rehearsal):
    out, _, report, _ = rehearsal
    files = files_under(out)
    assert len(files) <= 8 and all(len(f.parts) - 1 <= 2 for f in files)
    assert {str(f) for f in files} <= KEPT
    with tarfile.open(out / "results.tar.gz") as tar:  # what the stages wrote, packed and listed in the report
        names = [m.name for m in tar.getmembers() if m.isfile()]
    assert {"gpu_step_kernels.json", "gpu_step_kernels.md"} <= set(names)
    assert all(name in report for name in names)
    assert "## gpu_step_kernels" in report  # its table is in the report too


def test_a_stage_made_to_fail_is_named_in_the_report(rehearsal):
    _, _, report, log = rehearsal
    outcome = re.search(r"^- outcome: (.*)$", report, re.M).group(1)
    assert outcome.startswith("FAILED stages: ") and "e2e (exit 1)" in outcome
    assert stage_row(report, "e2e")[4:6] == ["FAILED", "1"]
    assert "rehearsal: stage e2e made to fail (FAIL_STAGE)" in log_section(log, "e2e")
    assert stage_row(report, "profile")[4] != "not run"  # the stages after it still ran


def test_a_stage_made_to_hang_is_stopped_by_its_limit(rehearsal):
    _, _, report, log = rehearsal
    fsdp = log_section(log, "fsdp")
    assert "$ sleep 100000   (limit 2 s)" in fsdp
    assert "(stopped by its limit of 2 s: exit 124)" in fsdp
    assert stage_row(report, "fsdp")[3:6] == ["2", "TIMED OUT", "124"]
    assert "fsdp (stopped by its 2 s limit)" in report
    for group in process_groups(fsdp):
        assert processes_in_group(group) == []  # the hung command and its group are gone


# ---- signals, settings, reruns ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_still_writes_the_report_and_stops_the_stage(tmp_path, sig):
    # the stage's limit (600 s) is far beyond the wait below: the signal, not the limit, must end it
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env_for(out, STAGES="steps", HANG_STAGE="steps", T_ALL="600"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = out / "log.txt"
    try:
        for _ in range(GUARD_S * 10):  # until the hanging stage's command has started
            if log.exists() and process_groups(log.read_text()):
                break
            if proc.poll() is not None:
                pytest.fail(f"the script ended early ({proc.returncode}): {log.read_text()[-2000:]}")
            time.sleep(0.1)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 128 + sig
    finally:
        if proc.poll() is None:
            proc.kill()
    report = (out / "report.md").read_text()
    assert f"the script was interrupted by {sig.name}" in report
    assert stage_row(report, "steps")[4:6] == ["INTERRUPTED", sig.name]
    assert stage_row(report, "plot")[4] == "not selected"
    assert processes_in_group(process_groups(log.read_text())[0]) == []
    assert {str(f) for f in files_under(out)} <= KEPT


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"STAGES": "plans,bogus"}, "STAGES='plans,bogus' names 'bogus', which is not a stage: expected a comma-separated list of info plans"),
        ({"T_E2E": "soon"}, "T_E2E='soon' is invalid: expected a whole number of seconds >= 1"),
        ({"HANG_STAGE": "nap"}, "HANG_STAGE='nap' is not a stage: expected one of info plans"),
        ({"SLOPE_TUNE_MAX_ALG_ID": "-1"}, "SLOPE_TUNE_MAX_ALG_ID='-1' is invalid: expected a whole number >= 0"),
    ],
    ids=["STAGES", "T_E2E", "HANG_STAGE", "SLOPE_TUNE_MAX_ALG_ID"],
)
def test_a_bad_setting_is_one_line_and_still_leaves_a_report(tmp_path, setting, message):
    out = tmp_path / "out"
    done = rehearse(out, **setting)
    assert done.returncode == 2
    assert f"\ngpu_check: {message}" in "\n" + done.stdout  # one line, the script's own
    report = (out / "report.md").read_text()
    assert "- outcome: ABORTED before the first stage: " in report and message in report
    assert "=== [" not in (out / "log.txt").read_text()  # no stage ran


def test_a_rerun_in_the_same_out_packs_the_previous_run(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        assert rehearse(out, STAGES="info").returncode == 0
    assert {str(f) for f in files_under(out)} == {"report.md", "log.txt", "results.tar.gz"}
    with tarfile.open(out / "results.tar.gz") as tar:
        assert {"previous/report.md", "previous/log.txt"} <= set(tar.getnames())


def test_the_stage_order_and_the_default_limits_fit_a_short_loan():
    # the riskiest new code first, each in its own process; memory right after the tests
    assert STAGES[1:6] == ["plans", "tests_plans", "tests_steps", "tests", "memory"]
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A GPU_LIMIT=\((.*?)\)", TEXT, re.S).group(1)))
    assert set(limits) == set(STAGES) and limits["memory"] == "60"
    settings = int(re.search(r"^T_SETTINGS=(\d+)$", TEXT, re.M).group(1))
    assert sum(map(int, limits.values())) + settings <= 360  # 6 minutes: a rerun fits the same 15-minute loan


def test_every_command_of_a_stage_runs_under_a_limit():
    """Each stage's commands go through `run` (timeout -k ...); none is started bare."""
    body = TEXT[TEXT.index("# ---- the stages"):TEXT.index("# ---- report.md")]
    for line in body.splitlines():
        code = line.split("  #", 1)[0]
        for command in re.split(r";|&&|\|\||\bthen\b|\belse\b|\bdo\b", code):  # each command of the line
            if re.match(r'("\$PY"|"\$\{cmd\[@\]\}"|nvidia-smi|python3?|pytest|torchrun)(\s|$)', command.strip()):
                pytest.fail(f"a stage command outside `run`: {line.strip()}")
    assert re.search(r'timeout -s "\$sig" -k "\$KILL_AFTER" "\$left" "\$@"', TEXT)


# ---- the benchmarks' CPU modes, in this process -------------------------------------------------------


@pytest.fixture
def fresh_selector():
    from slope.backends.select import SELECTOR

    SELECTOR.cache.clear()
    yield SELECTOR
    SELECTOR.cache.clear()


def rows_of(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


class Stop(Exception):
    """Stands for a time limit arriving in the middle of a benchmark."""


def stop_at_call(n: int, fn):
    """`fn`, except that call number `n` raises Stop."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Stop
        return fn(*args, **kwargs)

    return wrapped


def test_gpu_layers_keeps_every_row_measured_before_a_stop(tmp_path, monkeypatch):
    with benchmark_module("gpu_layers") as layers:
        monkeypatch.setattr(layers, "bench_shape", stop_at_call(2, layers.bench_shape))
        with pytest.raises(Stop):
            layers.main(["--out", str(tmp_path), "--device", "cpu", "--tokens", "64", "--sweep", "64", "128",
                         "--no-models"])
    assert [r["layer"] for r in rows_of(tmp_path / "gpu_layers.json")] == ["sweep h=64"]
    assert "sweep h=64" in (tmp_path / "gpu_layers.md").read_text()


def test_gpu_step_kernels_keeps_every_shape_measured_before_a_stop(tmp_path, monkeypatch):
    with benchmark_module("gpu_step_kernels") as steps:
        monkeypatch.setattr(steps, "bench_shape", stop_at_call(2, steps.bench_shape))
        with pytest.raises(Stop):
            steps.main(["--out", str(tmp_path), "--device", "cpu", "--shapes", "tiny"])
    rows = rows_of(tmp_path / "gpu_step_kernels.json")
    assert [r["layer"] for r in rows] == ["tiny"] and rows[0]["refresh_exact"] and rows[0]["column_exact"]


def test_gpu_profile_keeps_the_dense_step_measured_before_a_stop(tmp_path, monkeypatch, fresh_selector):
    with benchmark_module("gpu_profile") as profile:
        monkeypatch.setattr(profile, "build", stop_at_call(2, profile.build))  # the SLoPe model
        with pytest.raises(Stop):
            profile.main(["--out", str(tmp_path), "--device", "cpu", "--width", "tiny", "--layers", "1",
                          "--tokens", "64"])
    result = json.loads((tmp_path / "gpu_profile.json").read_text())
    step = next(r for r in result["rows"] if r["category"].startswith("step"))
    assert step["dense_ms"] > 0 and "slope_ms" not in step
    assert "amdahl_bound" not in result["metrics"]  # not before both steps and the products are measured


def test_gpu_e2e_tunes_prefill_at_the_training_bucket_and_keeps_rows_before_a_stop(tmp_path, monkeypatch,
                                                                                  fresh_selector):
    asked = []
    measure = fresh_selector.measure

    def recording(backend, device, tokens, **kw):
        asked.append(tokens)
        return measure(backend, device, tokens, **kw)

    monkeypatch.setattr(fresh_selector, "measure", recording)
    with benchmark_module("gpu_e2e") as e2e:
        # 2 x 64 training tokens (bucket 256), 8 x 64 prefill tokens (bucket 512)
        args = ["--out", str(tmp_path), "--device", "cpu", "--widths", "tiny", "--layers", "1", "--seq", "64",
                "--train-batch", "2", "--prefill-batch", "8", "--steps", "1", "--variants", "dense,slope"]
        e2e.main(args)
        rows = rows_of(tmp_path / "gpu_e2e.json")
        assert [(r["mode"], r["variant"]) for r in rows] == [("train", "dense"), ("train", "slope"),
                                                             ("prefill", "dense"), ("prefill", "slope")]
        assert asked and set(asked) == {256}  # prefill's layers too: no search at its own bucket
        monkeypatch.setattr(e2e, "infer_row", stop_at_call(1, e2e.infer_row))
        with pytest.raises(Stop):
            e2e.main(args)
    assert [(r["mode"], r["variant"]) for r in rows_of(tmp_path / "gpu_e2e.json")] == [("train", "dense"),
                                                                                         ("train", "slope")]


def test_the_probe_says_where_a_library_was_loaded_from():
    with benchmark_module("gpu_probe") as probe:
        assert "/" in probe.loaded_libraries("libc")  # a library every process here has mapped
        assert probe.loaded_libraries("libnot-a-library-xyz") == "not loaded in this process"


def test_the_library_search_looks_where_newer_cuda_wheels_put_cusparselt(tmp_path, monkeypatch):
    from slope.backends import cusparselt_library

    wanted = []
    for sub in ("nvidia/cusparselt/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"):
        site = tmp_path / sub.split("/")[1]
        lib = site / sub / "libcusparseLt.so.0"
        lib.parent.mkdir(parents=True)
        lib.write_bytes(b"")
        monkeypatch.syspath_prepend(str(site))
        wanted.append(str(lib))
    names = cusparselt_library.library_candidates()
    assert names[0] == "libcusparseLt.so.0"  # the copy torch loaded stays first
    assert all(w in names for w in wanted)
