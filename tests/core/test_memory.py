"""Training-state bytes, against sizes worked out by hand from the shapes."""

from __future__ import annotations

import torch
from torch import nn

from slope import SlopeConfig, SlopeLinear
from slope.memory import state_bytes, state_bytes_by_module


def model_and_step():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=True)
    model = nn.Sequential(nn.Linear(16, 64, bias=True), SlopeLinear.from_dense(dense, SlopeConfig(backend="reference")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    return model, opt


def test_every_kind_matches_the_shapes():
    model, opt = model_and_step()
    f32 = 4
    params = (16 * 64 + 64) + (32 * 32 + 32)  # dense (in 16, out 64) + bias; SlopeLinear kept values (32, 64/2) + bias
    got = state_bytes(model, opt)
    assert got["weights"] == params * f32
    assert got["grads"] == params * f32
    assert got["optimizer"] == 2 * params * f32 + 4 * f32  # exp_avg, exp_avg_sq; one fp32 step per parameter tensor
    assert got["buffers"] == 32 * 64 // 4 + (32 // 4) * 64  # row bits (out, in/4) + column bits (out/4, in), uint8
    assert got["caches"] == 0  # the reference backend keeps nothing between steps
    assert got["total"] == sum(got[k] for k in ("weights", "grads", "optimizer", "buffers", "caches"))


def test_per_module_rows_add_up_and_name_the_owner():
    model, opt = model_and_step()
    rows = state_bytes_by_module(model, opt)
    assert list(rows) == ["0", "1"]
    assert rows["1"]["weights"] == (32 * 32 + 32) * 4
    assert sum(r["weights"] for r in rows.values()) == state_bytes(model, opt)["weights"]


def test_shared_storage_is_counted_once():
    emb = nn.Embedding(100, 8)
    head = nn.Linear(8, 100, bias=False)
    head.weight = emb.weight  # tied, as language models tie input and output embeddings
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert state_bytes(model)["weights"] == 100 * 8 * 4
    assert state_bytes(model)["grads"] == 0  # no backward yet, no optimizer


def test_a_sparse_layer_stores_half_the_weights_of_a_dense_one():
    dense = nn.Linear(128, 64, bias=False)
    sparse = SlopeLinear.from_dense(dense, SlopeConfig(backend="reference"))
    assert state_bytes(sparse)["weights"] * 2 == state_bytes(dense)["weights"]
