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


def test_caches_count_the_compressed_operands_a_2_4_layer_keeps():
    # the emulated library keeps cuSPARSELt's buffers on a CPU: [kept values | one code per group]
    torch.manual_seed(0)
    layer = SlopeLinear.from_dense(nn.Linear(64, 32, bias=False), SlopeConfig(backend="emulated",
                                                                             backward_mask_interval=4))
    layer(torch.randn(8, 64, requires_grad=True)).square().mean().backward()  # grad_input needs an input grad
    out_buffer = (32 * 64 // 2 + 32 * 64 // 4) * 4  # W_R (32, 64) in fp32: values + metadata codes
    gi_buffer = (64 * 32 // 2 + 64 * 32 // 4) * 4  # W_RCᵀ (64, 32)
    index_map = 64 * 32 // 2 * 4  # int32, one per W_RCᵀ kept value (interval > 1 keeps it)
    assert state_bytes(layer)["caches"] == out_buffer + gi_buffer + index_map
