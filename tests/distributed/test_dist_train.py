"""`slope train` on two processes equals one process with the same global batch: DDP and FSDP2.

Each rank draws the same global batch and takes its slice, so the two runs see the same windows;
they differ only in the order floating-point sums are taken (each rank averages its half of the
batch, then the ranks average the two halves; one process averages all of it at once). Measured on
this test: 1.2e-7 relative on the losses and 2.7e-7 absolute on the weights after 6 steps; the
tolerances below are ~15x and ~40x that, while any real fault (a rank reading the other's windows,
a missing gradient average, adapters outside the wrapper, a miscounted mask step) moves them by 1e-3
or more. Masks, packed bits and step counters are integers and must be equal.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from conftest import (
    GRAD_ACCUM,
    MAX_STEPS,
    PER_RANK_BATCH,
    final_weights,
    run_job,
    torchrun,
    train_args,
    train_losses,
)

from slope.io.checkpoint import load_checkpoint, verify_checkpoint

LOSS_RTOL = 2e-6
WEIGHT_ATOL = 1e-5


def assert_same_run(run_dir, reference) -> None:
    ours, theirs = train_losses(run_dir), train_losses(reference)
    assert sorted(ours) == list(range(1, MAX_STEPS + 1)) == sorted(theirs)
    for step in ours:
        assert math.isclose(ours[step], theirs[step], rel_tol=LOSS_RTOL), (step, ours[step], theirs[step])
    a, b = final_weights(run_dir), final_weights(reference)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], atol=WEIGHT_ATOL, rtol=0, msg=name)
        else:  # masks, packed bits and step counters: exactly equal
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_with_adapters_joining(parallel, prepared, reference, tmp_path):
    run_dir = tmp_path / "run"
    run_job([*torchrun(2), *train_args(run_dir, prepared, f"--train.batch_size={PER_RANK_BATCH}",
                                       f"--run.parallel={parallel}")], run_dir)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"adapters_added"' in line]
    assert len(events) == 1, "the adapters joined once, mid-run"
    assert_same_run(run_dir, reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["parallel"]) == (2, 2 * PER_RANK_BATCH * GRAD_ACCUM, parallel)
    # the checkpoint is an ordinary one: verified, loadable (eval, export) without any process group
    final = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert verify_checkpoint(final)["adapters"] is True
    model, _, _ = load_checkpoint(final)
    assert any(name.endswith("adapter_a") for name, _ in model.named_parameters())
    assert (final / "dcp").is_dir() == (parallel == "fsdp")
    # rank 0 alone writes the run directory: nothing but its files there
    assert not list(run_dir.glob("**/*rank*"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_dense(parallel, prepared, tmp_path):
    reference = tmp_path / "reference"
    run_job([sys.executable, *train_args(reference, prepared, "--method=dense",
                                         f"--train.batch_size={2 * PER_RANK_BATCH}")], reference)
    run_dir = tmp_path / "run"
    run_job([*torchrun(2), *train_args(run_dir, prepared, "--method=dense", f"--train.batch_size={PER_RANK_BATCH}",
                                       f"--run.parallel={parallel}")], run_dir)
    assert_same_run(run_dir, reference)
