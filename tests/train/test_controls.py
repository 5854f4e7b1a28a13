"""The controls of the method comparison: dense, slope and slope without double pruning train; without
double pruning grad_input uses W_R; model.linear_init_scale scales exactly the block linear weights,
and each method has its own default of it; every train record holds the gradient norm and whether it was clipped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from _method_runs import assert_loss_falls, train, train_records
from _tolerances import assert_within, product_bound

import slope
from slope.train import models, runconfig
from slope.train.trainer import Trainer


@pytest.fixture(scope="module")
def text(text_corpus):
    return text_corpus() / "train.txt"  # tests/conftest.py


@pytest.mark.parametrize("args", [["--method=dense"], ["--method=slope"],
                                  ["--method=slope", "--slope.double_prune=false"]],
                         ids=["dense", "slope", "slope-no-double-prune"])
def test_each_control_trains(text, tmp_path, args, caplog):
    with caplog.at_level(logging.INFO, logger="slope"):
        train(text, tmp_path / "run", *args)
    assert_loss_falls(tmp_path / "run")
    # each trains from its method's default init scale (docs/methods.md, "Which of these become defaults")
    scale = DEFAULT_INIT_SCALE[args[0].removeprefix("--method=")]
    assert f"linear_init_scale = {scale}\n" in (tmp_path / "run" / "config.toml").read_text()
    scaled = f"model.linear_init_scale {scale:g}: scaled the initial weights of 14 block linear layers"
    assert (scaled in caplog.text) == (scale != 1.0)


# The init scale of each method when the run sets none: dense and slope by the quality study's verdicts, the
# others as built.
DEFAULT_INIT_SCALE = {"dense": 0.7071, "slope": 0.7071, "srste": 1.0, "wanda": 1.0}


@pytest.mark.parametrize("method", sorted(DEFAULT_INIT_SCALE))
def test_each_method_resolves_its_own_default_init_scale_and_a_set_one_stays(method):
    assert runconfig.resolve(None, [f"--method.name={method}"]).model.linear_init_scale == DEFAULT_INIT_SCALE[method]
    for given in ("0.9", "1.0"):
        cfg = runconfig.resolve(None, [f"--method.name={method}", f"--model.linear_init_scale={given}"])
        assert cfg.model.linear_init_scale == float(given)
    # a RunConfig built in Python resolves it too, when the trainer takes it (0 would zero every block weight)
    cfg = runconfig.RunConfig()
    cfg.method.name = method
    assert cfg.model.linear_init_scale == 0
    Trainer(cfg, Path("unused"))
    assert cfg.model.linear_init_scale == DEFAULT_INIT_SCALE[method]


def test_without_double_pruning_grad_input_uses_w_r():
    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 8)
    x, dy = torch.randn(5, 16, requires_grad=True), torch.randn(5, 8)
    grads = {}
    for double_prune in (False, True):
        layer = slope.SlopeLinear.from_dense(dense, slope.SlopeConfig(double_prune=double_prune, backend="reference"))
        x.grad = None
        layer(x).backward(dy)
        grads[double_prune] = x.grad.clone()
        w_r = layer.dense_weight()
    # the same product summed in another order: within product_bound (tests/_tolerances.py)
    assert_within(grads[False], dy @ w_r, product_bound(dy, w_r), "grad_input")
    assert not torch.allclose(grads[True], dy @ w_r)  # the double-pruned W_RC differs: the test can tell


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_linear_init_scale_scales_exactly_the_block_linear_weights(preset):
    cfg = runconfig.resolve("tiny")
    cfg.model.preset = preset
    config = models.model_config(cfg.model, vocab_size=128, seq_len=32)
    torch.manual_seed(0)
    before = models.build_model(config).state_dict()
    torch.manual_seed(0)
    model = models.build_model(config)
    assert models.scale_block_linears(model, 1.0) == 0
    count = models.scale_block_linears(model, 0.5)
    assert count == (7 if preset == "llama" else 4) * cfg.model.num_layers
    block_linears = {f"{name}.weight" for name, module in model.named_modules()
                     if {"layers", "h"} & set(name.split("."))  # inside LLaMA's layers / GPT-2's h
                     and (isinstance(module, torch.nn.Linear) or slope.linear.is_conv1d(module))}
    assert len(block_linears) == count
    for key, value in model.state_dict().items():
        expected = before[key] * 0.5 if key in block_linears else before[key]
        assert torch.equal(value, expected), key  # embeddings, LM head, norms and biases untouched


def test_a_scaled_dense_run_without_clipping_logs_grad_norm_and_clip_rate(text, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="slope"):
        train(text, tmp_path / "run", "--method=dense", "--model.linear_init_scale=0.7071", "--optim.grad_clip=0")
    assert "model.linear_init_scale 0.7071: scaled the initial weights of 14 block linear layers" in caplog.text
    records = train_records(tmp_path / "run")
    assert len(records) == 8 and all(r["grad_norm"] > 0 and r["clipped"] == 0.0 for r in records)
    assert_loss_falls(tmp_path / "run")
