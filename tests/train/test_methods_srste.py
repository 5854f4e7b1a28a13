"""`--method srste`: the layer's maths against float64 references, the dynamic mask, the decay, and a
tiny run whose checkpoints every reader sees pruned and whose resume is bit-exact."""

from __future__ import annotations

import json

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
from _tolerances import assert_within, product_bound, unit_roundoff
from safetensors.torch import load_file

import slope
from slope import cli
from slope.io import checkpoint
from slope.srste import SrsteLinear, srste_layers
from slope.train import models, runconfig
from slope.train.evaluation import evaluate
from slope.train.methods import get_method
from slope.train.token_files import TokenFile


def reference_mask(w: torch.Tensor) -> torch.Tensor:
    """2:4 along `in` (dim 1), by the shared oracle."""
    return nm_mask_oracle(w, 2, 4, dim=1)


def layer_of(w: torch.Tensor, b: torch.Tensor | None, decay: float) -> SrsteLinear:
    dense = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if b is not None:
            dense.bias.copy_(b)
    return SrsteLinear.from_dense(dense, 2, 4, decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_match_the_float64_formulas(dtype):
    torch.manual_seed(0)
    w, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    w[0, :4] = torch.tensor([0.5, -0.5, 0.5, 0.1], dtype=torch.float64)  # a tie: the lower two indices win
    x, dy = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    decay = 0.1
    layer = layer_of(w.to(dtype), b.to(dtype), decay)
    xs = x.to(dtype).requires_grad_()
    y = layer(xs)
    y.backward(dy.to(dtype))

    mask = reference_mask(w)
    assert mask[0, :4].tolist() == [True, True, False, False]
    wm = w * mask
    x2, dy2 = x.reshape(-1, 16), dy.reshape(-1, 8)
    # in `dtype` against float64 (tests/_tolerances.py): each product of inner length n ≥ 2 within
    # product_bound, 2γ_n·|a||b|, which holds its own rounding (γ_n) and that of its float64 inputs cast
    # to `dtype` (2u); a bias, a scalar, a sum of two terms: u each, of what they round
    u2 = 2 * unit_roundoff(dtype)
    # (decay * w first: decay * (~mask) would be a float32 tensor, decay rounded to 1.49e-9 off)
    y_ref, decayed = x @ wm.t() + b, decay * w * (~mask)
    assert_within(y, y_ref, product_bound(x, wm.t(), dtype) + u2 * (y_ref.abs() + b.abs()), "y")
    assert_within(xs.grad, dy @ wm, product_bound(dy, wm, dtype), "grad x")  # through W ⊙ M, not W
    grad_w = dy2.t() @ x2 + decayed
    assert_within(layer.weight.grad, grad_w,
                  product_bound(dy2.t(), x2, dtype) + u2 * (grad_w.abs() + 2 * decayed.abs()), "grad W")
    ones = torch.ones(1, dy2.shape[0], dtype=torch.float64)
    assert_within(layer.bias.grad, dy2.sum(0), product_bound(ones, dy2, dtype)[0], "grad b")


def test_decay_acts_on_the_pruned_weights_only():
    torch.manual_seed(1)
    w = torch.randn(8, 16)
    layer = layer_of(w, None, 0.25)
    (layer(torch.randn(4, 16)) * 0).sum().backward()  # dy = 0: the gradient is the decay alone
    mask = reference_mask(w)
    expected = (0.25 * w.double() * (~mask)).float()
    assert torch.equal(layer.weight.grad[mask], torch.zeros(int(mask.sum())))  # kept: no decay at all
    # one float32 product by 0.25 (exact) and by the mask: at most one rounding, u of the value
    assert_within(layer.weight.grad, 0.25 * w.double() * (~mask), unit_roundoff() * expected.abs(), "decay")
    assert (layer.weight.grad[~mask] != 0).all()


def test_the_mask_follows_the_weights_between_steps():
    torch.manual_seed(2)
    layer = layer_of(torch.randn(8, 16), None, 2e-4)
    target = torch.randn(8, 16)  # a dense target: the weights must move across the mask's boundary
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, weight_decay=0.0)
    first = layer.mask()
    x = torch.randn(64, 16)
    for _ in range(20):
        loss = (layer(x) - x @ target.t()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    now = layer.mask()
    assert not torch.equal(now, first)
    assert torch.equal(now, reference_mask(layer.weight.detach()))
    # the forward multiplies with the current mask, not the one it started with
    current = (layer.weight.detach() * now).t()
    assert_within(layer(x), x @ current, product_bound(x, current), "y")  # the same product, another order


def test_the_method_converts_what_sparsify_converts_and_splits_the_decay_over_micro_batches():
    cfg = runconfig.resolve("tiny")
    config = models.model_config(cfg.model, vocab_size=128, seq_len=32)
    torch.manual_seed(0)
    reference = slope.sparsify(models.build_model(config), cfg.slope)
    torch.manual_seed(0)
    model = models.build_model(config)
    get_method("srste", cfg.slope, {"srste_decay": 1e-3, "grad_accum": 4}).apply(model)
    assert [name for name, _ in srste_layers(model)] == reference.slope_report.converted
    assert {layer.decay for _, layer in srste_layers(model)} == {1e-3 / 4}
    assert not slope.slope_layers(model) and "slope" not in model.config.to_dict()


def test_the_run_splits_the_decay_over_its_micro_batches(text_corpus, tmp_path):
    """Through `slope train`'s own wiring: with train.grad_accum 2 each backward adds half the decay, so two
    micro-batches of 2 windows train as one batch of 4. The decay is part of each gradient (on the pruned
    weights), so a decay that reached the layers unsplit shows in the logged gradient norm."""
    text = text_corpus() / "train.txt"
    common = ("--method=srste", "--method.srste_decay=0.5", "--train.max_steps=3", "--checkpoint.every=3")
    train(text, tmp_path / "one", *common, "--train.batch_size=4")
    train(text, tmp_path / "two", *common, "--train.batch_size=2", "--train.grad_accum=2")
    assert_same_training_up_to_summation_order(tmp_path / "two", tmp_path / "one")


@pytest.fixture(scope="module")
def srste_run(text_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("srste") / "run"
    train(text_corpus() / "train.txt", run_dir, "--method=srste", "--method.srste_decay=1e-3")
    return run_dir


def test_srste_trains_and_records_its_decay(srste_run):
    assert_loss_falls(srste_run)
    summary = json.loads((srste_run / "summary.json").read_text())
    assert summary["method"] == "srste" and summary["method_options"] == {"srste_decay": 1e-3}
    info = json.loads((checkpoint.latest_checkpoint(srste_run) / "slope.json").read_text())
    assert info["prune_on_load"] is True and info["srste_decay"] == 1e-3 and info["slope_config"]["n"] == 2


def test_every_reader_sees_the_pruned_model(srste_run, tmp_path, capsys):
    ckpt = checkpoint.latest_checkpoint(srste_run)
    dense = load_file(ckpt / "model.safetensors")
    model, _, _ = checkpoint.load_checkpoint(srste_run)
    layers = slope.slope_layers(model)
    assert len(layers) == 11
    for name, layer in layers:  # the stored dense weight through its magnitude mask: W ⊙ M
        w = dense[f"{name}.weight"]
        assert torch.equal(layer.dense_weight(), w * reference_mask(w))
    # the final evaluation of the run (the training layers) is the loaded model's, to the last bit
    summary = json.loads((srste_run / "summary.json").read_text())
    tokens = TokenFile(srste_run / "data" / "val")
    result = evaluate(model, tokens, seq_len=64, batch_size=8, max_tokens=1024, progress=False)
    assert result == summary["eval"]["val"]
    # export (compressed, 2:4) and generate read it too
    capsys.readouterr()
    assert cli.main(["export", str(srste_run), "--out", str(tmp_path / "export")]) == 0
    assert cli.main(["generate", str(tmp_path / "export"), "--prompt", "The", "--max-new-tokens", "3"]) == 0
    assert cli.main(["generate", str(srste_run), "--prompt", "The", "--max-new-tokens", "3"]) == 0


def test_resume_is_bit_exact(srste_run, tmp_path):
    resumed = tmp_path / "resumed"
    resume_from(srste_run, 4, resumed)
    assert_same_end(srste_run, resumed)
