"""Tiny `slope train` runs of the methods (tests/train/test_methods_*.py, test_controls.py): the shared
~60 kB of Shakespeare (the text_corpus fixture, tests/conftest.py), a 2-layer 64-wide LLaMA, 8 steps,
checkpoints every 2 steps, no extra evaluation sets."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file

from slope import cli
from slope.io import checkpoint
from slope.train.logs import read_metrics


def train(text, run_dir, *extra) -> None:
    args = ["train", "--config", "tiny", "--no-progress", f"--data.train={text}", "--data.val=",
            "--data.val_fraction=0.1", "--eval.sets=", "--tokenizer.vocab_size=320", "--eval.every=0",
            "--checkpoint.every=2", "--checkpoint.keep_last=4", "--run-dir", str(run_dir), *extra]
    assert cli.main(args) == 0


def train_records(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in train_records(run_dir)]


def assert_same_training_up_to_summation_order(run_a, run_b) -> None:
    """The two runs' losses and gradient norms (before clipping), step by step, within what summation
    order alone can move them (tests/_tolerances.py, from the model's reduction chains): for the same
    training on 2 processes and on 1, or in micro-batches and in one batch, with the same global batch."""
    import json
    import math

    from _tolerances import grad_norm_rtol, gradient_reductions, loss_reductions, training_loss_rtol
    from transformers import AutoConfig

    from slope.train import runconfig

    cfg = runconfig.resolve(str(run_b / "config.toml"))
    config = AutoConfig.from_pretrained(checkpoint.latest_checkpoint(run_b))
    seq = cfg.train.seq_len
    tokens = seq * json.loads((run_b / "summary.json").read_text())["global_batch"]
    forward_n, backward_n = loss_reductions(config, seq, tokens), gradient_reductions(config, seq, tokens)
    weights = load_file(checkpoint.latest_checkpoint(run_b) / "model.safetensors").values()
    norm_n = max(t.numel() for t in weights) + len(weights)
    a, b = {r["step"]: r for r in train_records(run_a)}, {r["step"]: r for r in train_records(run_b)}
    assert sorted(a) == sorted(b)
    for step in b:
        for key, tol in (("loss", training_loss_rtol(step, forward_n, backward_n)),
                         ("grad_norm", grad_norm_rtol(step, backward_n, norm_n))):
            assert math.isclose(a[step][key], b[step][key], rel_tol=tol), (
                f"step {step} {key}: {a[step][key]} vs {b[step][key]} (relative {tol:.3g})")


def assert_loss_falls(run_dir) -> None:
    values = [loss for _, loss in losses(run_dir)]
    assert len(values) == 8 and values[-1] < values[0] - 0.5, values


def resume_from(run_dir, step: int, into) -> None:
    """Copy the run, keep its checkpoints up to `step`, resume it to the end."""
    shutil.copytree(run_dir, into)
    for ckpt in checkpoint.list_checkpoints(into):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    (into / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    assert cli.main(["train", "--resume", str(into), "--no-progress"]) == 0


def assert_same_end(run_a, run_b) -> None:
    """Bit for bit: the losses logged and every tensor of the final checkpoint."""
    assert losses(run_a) == losses(run_b)
    a = load_file(checkpoint.latest_checkpoint(run_a) / "model.safetensors")
    b = load_file(checkpoint.latest_checkpoint(run_b) / "model.safetensors")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "weights differ bitwise"
