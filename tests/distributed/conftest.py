"""Two CPU processes (gloo, 127.0.0.1 only) running `slope train` under torchrun, and one to compare with.

Every run trains on one small corpus prepared once (no tokenizer training per run). Runs are
subprocesses with a timeout, started in their own session so that a test can kill the whole job
(torchrun and its workers) at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

RUN_TIMEOUT = 240  # seconds for one job: generous for a loaded 2-core machine, and no test can hang
MAX_STEPS = 6  # tiny's adapter_start 0.75 puts the adapters before step 5: the run crosses the switch
PER_RANK_BATCH = 2
GRAD_ACCUM = 2  # micro-steps: the all-reduce is skipped on the first (no_sync), so that path is tested


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    # one thread per process: two ranks on two cores, and no oversubscription warning from torchrun
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def train_args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [
        "-m", "slope", "train", "--config", "tiny", "--run-dir", str(run_dir), "--no-progress",
        f"--data.train={data}", f"--train.max_steps={MAX_STEPS}", f"--train.grad_accum={GRAD_ACCUM}", "--eval.every=0",
        "--eval.sets=[]",
        "--eval.final_max_tokens=256", "--eval.max_tokens=256", "--checkpoint.every=2", "--checkpoint.keep_last=5",
        *extra,
    ]


def log_of(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".log")


def run_job(command: list[str], run_dir: Path, expect: int = 0, timeout: float = RUN_TIMEOUT) -> str:
    """Run `command` to its end (killed with its workers after `timeout`); its output, after checking the exit code."""
    with open(log_of(run_dir), "a") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{command} did not end within {timeout} s:\n{log_of(run_dir).read_text()[-3000:]}")
    text = log_of(run_dir).read_text()
    assert code == expect, f"{command} exited {code}, expected {expect}:\n{text[-4000:]}"
    return text


def train_records(run_dir: Path) -> dict[int, dict]:
    """Each step's train record in metrics.jsonl (loss, grad_norm, lr, ...), by step."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records if r.get("kind") == "train"}


def train_losses(run_dir: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in train_records(run_dir).items()}


def final_weights(run_dir: Path, step: int = MAX_STEPS) -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


@pytest.fixture(scope="session")
def prepared(text_corpus, tmp_path_factory) -> Path:
    """The shared corpus (tests/conftest.py) tokenized once (vocab 320), used as data.train by every run."""
    out = tmp_path_factory.mktemp("dist-data") / "prepared"
    text = text_corpus() / "train.txt"
    result = subprocess.run([sys.executable, "-m", "slope", "prepare", str(text), "-o", str(out), "--vocab-size", "320",
                             "--val-fraction", "0.1"], capture_output=True, text=True, env=env(), timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="session")
def reference(prepared, tmp_path_factory) -> Path:
    """One process with the global batch of two ranks (2 x PER_RANK_BATCH): what every 2-rank run must equal."""
    run_dir = tmp_path_factory.mktemp("dist-ref") / "run"
    run_job([sys.executable, *train_args(run_dir, prepared, f"--train.batch_size={2 * PER_RANK_BATCH}")], run_dir)
    return run_dir
