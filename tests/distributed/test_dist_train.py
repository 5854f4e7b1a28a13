"""`slope train` on two processes equals one process with the same global batch: DDP and FSDP2.

Each rank draws the same global batch and takes its slice, so the two runs see the same windows;
they differ only in the order floating-point sums are taken (each rank averages its half of the
batch, then the ranks average the two halves; one process averages all of it at once). The
tolerances are bounds on what summation order alone can do (tests/_tolerances.py), on any machine:
- the training loss and the gradient norm of every step: the forward's and backward's reduction
  chains (2.6e-4 and 1.5e-3 relative at step 1, each growing by 6.3e-4 a step), seen: 5e-8 and 3e-7;
- every weight: AdamW's worst case over the run (0.083 absolute), seen: 1e-5.
Masks, packed bits and step counters are integers and must be equal.
Planted faults, two ranks against one process (DDP): rank 1 reading rank 0's windows fails the
step-1 loss (2.9e-3 against 2.6e-4); the all-reduce skipped on step 3 fails that step's gradient norm
(7.8e-2 against 2.8e-3); rank 1's gradient scaled by 1.01 on step 3 fails it too (5.0e-3 against
2.8e-3) and changes the column masks. The weight bound catches none of these: it is a check that a
correct run cannot fail, the per-step losses and norms are the ones that find faults.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from _tolerances import (
    adamw_drift,
    assert_within,
    grad_norm_rtol,
    gradient_reductions,
    loss_reductions,
    training_loss_rtol,
)
from conftest import (
    GRAD_ACCUM,
    MAX_STEPS,
    PER_RANK_BATCH,
    final_weights,
    run_job,
    torchrun,
    train_args,
    train_records,
)
from transformers import AutoConfig

from slope.io.checkpoint import load_checkpoint, verify_checkpoint
from slope.train import runconfig
from slope.train.optim import lr_at


def assert_same_run(run_dir, reference) -> None:
    """`run_dir` is `reference` but for summation order: per-step losses and gradient norms, final weights."""
    ours, theirs = train_records(run_dir), train_records(reference)
    assert sorted(ours) == list(range(1, MAX_STEPS + 1)) == sorted(theirs)
    cfg = runconfig.resolve(str(reference / "config.toml"))
    model_config = AutoConfig.from_pretrained(reference / "checkpoints" / f"step_{MAX_STEPS:08d}")
    a, b = final_weights(run_dir), final_weights(reference)
    floats = [t for t in b.values() if t.is_floating_point()]
    seq, tokens = cfg.train.seq_len, cfg.train.seq_len * json.loads((reference / "summary.json").read_text())["global_batch"]
    forward_n, backward_n = loss_reductions(model_config, seq, tokens), gradient_reductions(model_config, seq, tokens)
    norm_n = max(t.numel() for t in floats) + len(floats)
    for step in ours:
        loss_tol, norm_tol = training_loss_rtol(step, forward_n, backward_n), grad_norm_rtol(step, backward_n, norm_n)
        for key, tol in (("loss", loss_tol), ("grad_norm", norm_tol)):
            mine, ref = ours[step][key], theirs[step][key]
            assert math.isclose(mine, ref, rel_tol=tol), f"step {step} {key}: {mine} vs {ref}, relative tolerance {tol:.3g}"
    drift = adamw_drift([lr_at(s, cfg) for s in range(MAX_STEPS)], (cfg.optim.beta1, cfg.optim.beta2),
                        cfg.optim.weight_decay, magnitude=max(t.abs().max().item() for t in floats))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        if a[name].is_floating_point():
            assert_within(a[name], b[name], drift, name)
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


def test_gradient_accumulation_equals_one_batch_of_all_its_micro_batches(prepared, reference, tmp_path):
    """train.grad_accum micro-batches of b windows make the step one batch of grad_accum·b windows makes.

    The reference accumulates GRAD_ACCUM micro-batches; this run takes them as one batch (the sampler
    draws the same windows either way). Each micro-batch's loss must count 1/grad_accum: AdamW hides a
    wrong scale in the weights (its update is scale-invariant), but not in the logged loss, the gradient
    norm or the clipping.
    """
    run_dir = tmp_path / "run"
    run_job([sys.executable, *train_args(run_dir, prepared, f"--train.batch_size={2 * PER_RANK_BATCH * GRAD_ACCUM}",
                                         "--train.grad_accum=1")], run_dir)
    assert_same_run(run_dir, reference)


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
