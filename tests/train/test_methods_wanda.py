"""`--method wanda`: the score and its ties against a per-group loop, the prune at its step with the
calibration inputs of the step before, the optimizer afterwards, and a bit-exact resume across it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _method_runs import (
    assert_loss_falls,
    assert_same_end,
    assert_same_training_up_to_summation_order,
    resume_from,
    train,
)
from _oracles import nm_mask_oracle
from _torchrun import run_slope_on_two_ranks

import slope
from slope.io import checkpoint
from slope.train import models, runconfig
from slope.train.evaluation import causal_lm_loss
from slope.train.methods import get_method, wanda_mask
from slope.train.optim import build_optimizer


def reference_wanda(w: torch.Tensor, norms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Score |W_ij|·‖X_j‖ (float64: exact for float32 factors), the n highest of each m along `in`, ties to
    the lower index: the shared oracle on the scores."""
    return nm_mask_oracle(w.detach().double().abs() * norms.detach().double(), n, m, dim=1)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8)])
def test_the_mask_keeps_n_of_m_by_score_with_ties(n, m):
    torch.manual_seed(0)
    # small integers: many equal scores, so the tie rule decides often
    w = torch.randint(-3, 4, (16, 32)).float()
    norms = torch.randint(1, 4, (32,)).float()
    mask = wanda_mask(w, norms, n, m)
    assert torch.equal(mask, reference_wanda(w, norms, n, m))
    assert (mask.view(16, -1, m).sum(-1) == n).all()


def test_the_input_norm_changes_the_choice():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])  # column 0's inputs are large: |1|·10 beats |4|·1
    assert wanda_mask(w, norms, 2, 4).tolist() == [[True, False, False, True]]


def tiny():
    cfg = runconfig.resolve("tiny")
    torch.manual_seed(0)
    model = models.build_model(models.model_config(cfg.model, vocab_size=128, seq_len=32))
    return model, cfg


def test_the_prune_uses_the_step_before_and_leaves_the_optimizer_with_the_new_parameters():
    model, cfg = tiny()
    method = get_method("wanda", cfg.slope.replace(adapter_start=1.0), {"wanda_dense_fraction": 0.5})
    method.apply(model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    max_steps = 6
    assert method.prune_step(max_steps) == 3 and method.structure_steps(max_steps) == [3]
    name = "model.layers.1.mlp.down_proj"
    seen = []  # this test's own record of what the layer read at the step before the prune
    torch.manual_seed(1)
    for step in range(3):
        assert method.before_step(step, max_steps, model, optimizer, {}) is None
        hook = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
        batch = torch.randint(0, 128, (2, 17))
        causal_lm_loss(model, batch[:, :-1], batch[:, 1:]).backward()
        hook.remove()
        if step < 2:
            seen.clear()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()  # an evaluation between calibration and prune must not count
        model(input_ids=torch.randint(0, 128, (2, 16)))
        model.train()
    dense_weight = model.get_submodule(name).weight.detach().clone()
    old_params = {id(p) for p in model.parameters()}
    event = method.before_step(3, max_steps, model, optimizer, {})
    assert event["event"] == "wanda_pruned" and event["layers"] == 11

    norms = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).double().pow(2).sum(0).sqrt()
    layer = model.get_submodule(name)
    assert torch.equal(layer.row_mask(), reference_wanda(dense_weight, norms, 2, 4))
    assert torch.equal(layer.dense_weight(), dense_weight * layer.row_mask())
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters()}
    assert len(in_optimizer) == len(list(model.parameters()))
    new = {id(layer.weight) for _, layer in slope.slope_layers(model)}
    assert new.isdisjoint(old_params)
    # the kept values continue with their AdamW moments, gathered at the mask
    assert optimizer.state[layer.weight]["exp_avg"].shape == layer.weight.shape
    assert not method.before_step(4, max_steps, model, optimizer, {})  # once


@pytest.fixture(scope="module")
def wanda_run(text_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("wanda") / "run"
    # 8 steps: dense for 4 (calibration on step 4's batch), pruned before step 5, adapters before step 7
    train(text_corpus() / "train.txt", run_dir, "--method=wanda", "--method.wanda_dense_fraction=0.5")
    return run_dir


def test_wanda_prunes_at_its_step_and_trains(wanda_run):
    assert_loss_falls(wanda_run)
    events = [(r["event"], r["step"]) for r in checkpoint_events(wanda_run)]
    assert events == [("wanda_pruned", 4), ("adapters_added", 6)]
    infos = {p.name: json.loads((p / "slope.json").read_text()) for p in checkpoint.list_checkpoints(wanda_run)}
    assert [infos[f"step_0000000{s}"]["pruned"] for s in (2, 4, 6, 8)] == [False, False, True, True]
    assert infos["step_00000004"]["slope_config"] is None and infos["step_00000006"]["slope_config"]["n"] == 2
    model, _, _ = checkpoint.load_checkpoint(wanda_run)
    assert len(slope.slope_layers(model)) == 11
    summary = json.loads((wanda_run / "summary.json").read_text())
    assert summary["method_options"]["wanda_dense_fraction"] == 0.5


def checkpoint_events(run_dir):
    from slope.train.logs import read_metrics

    return [r for r in read_metrics(run_dir) if r["kind"] == "event"]


@pytest.mark.parametrize("step", [4, 6])  # 4: calibrated, not yet pruned; 6: pruned
def test_resume_across_the_prune_is_bit_exact(wanda_run, tmp_path, step):
    resumed = tmp_path / "resumed"
    resume_from(wanda_run, step, resumed)
    assert_same_end(wanda_run, resumed)


@pytest.mark.slow
def test_two_ranks_resume_across_the_calibration_is_bit_exact(wanda_run, text_corpus, tmp_path):
    """Under DDP each rank calibrates on its share of the batch; a checkpoint between the calibration step
    and the prune must hold the sums over both ranks (rank 0 writes it), or the resumed mask differs."""

    text = text_corpus() / "train.txt"
    run_dir = tmp_path / "ddp"
    run_slope_on_two_ranks("train", "--config", "tiny", "--no-progress", f"--data.train={text}", "--data.val=",
             "--data.val_fraction=0.1", "--eval.sets=", "--tokenizer.vocab_size=320", "--eval.every=0",
             "--checkpoint.every=2", "--checkpoint.keep_last=4", "--train.batch_size=2", "--run.parallel=ddp",
             "--method=wanda", "--run-dir", str(run_dir))
    # 2 ranks x 2 windows = 1 process x 4 windows (the same mask: the loss would jump otherwise)
    assert_same_training_up_to_summation_order(run_dir, wanda_run)
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    for ckpt in checkpoint.list_checkpoints(resumed):
        if ckpt.name > "step_00000004":
            shutil.rmtree(ckpt)
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    run_slope_on_two_ranks("train", "--resume", str(resumed), "--no-progress")
    assert_same_end(run_dir, resumed)
