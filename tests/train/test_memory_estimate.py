"""slope memory: the fake-tensor estimate against real CPU allocations, the simulated GPU's operands,
values stored once at inference, the floor's arithmetic, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import slope
from slope.backends import simulate
from slope.memory import MemoryTracker, state_bytes
from slope.train.memory_estimate import (
    EstimateError,
    MemoryRequest,
    build,
    compare,
    estimate_memory,
    floor_bytes,
)

SMALL = {"model": "default", "layers": 2, "batch": 2, "seq_len": 64}


def profiled_training_peak(request: MemoryRequest) -> tuple[int, int]:
    """(peak, end) bytes of two real training steps on the CPU, read from the profiler's allocation
    events: a measurement independent of the estimator's tracker. Starts from the model's own state."""
    torch.manual_seed(0)
    model = build(request)
    start = state_bytes(model)["total"]  # parameters and buffers, before any step
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-4, fused=True)
    slope.track_steps(optimizer)
    tokens = torch.randint(0, model.config.vocab_size, (request.batch, request.seq_len + 1))
    autocast = request.precision == "bf16-autocast"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=tokens[:, :-1]).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            del logits
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return start + peak, start + current


UNTIED = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 688,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "max_position_embeddings": 256, "tie_word_embeddings": False}


@pytest.mark.parametrize(("method", "precision", "tied"), [
    ("dense", "fp32", True), ("slope", "fp32", True),
    # under autocast a tied embedding's two gradients are summed out of place under the tracker (one
    # extra fp32 copy of it at that moment, see docs/memory.md); an untied model is exact
    ("dense", "bf16-autocast", False), ("slope", "bf16-autocast", False),
])
def test_estimate_agrees_with_real_cpu_allocations_within_5_percent(method, precision, tied, tmp_path):
    # the CPU path: what a real run allocates can be measured here; the estimate runs on fake tensors
    # (nothing allocated) through the same code
    model = dict(SMALL)
    if not tied:
        (tmp_path / "config.json").write_text(json.dumps(UNTIED))
        model = {"model": str(tmp_path / "config.json"), "batch": 2, "seq_len": 64}
    request = MemoryRequest(**model, method=method, precision=precision, backend="reference")
    estimate = estimate_memory(request, on_gpu=False)
    peak, end = profiled_training_peak(request)
    assert estimate["peak_bytes"] == pytest.approx(peak, rel=0.05)
    assert estimate["state_bytes"] == pytest.approx(end, rel=0.05)
    # and the tracker counts the real run exactly as it counts the fake one
    real = estimate_memory(request, fake=False, on_gpu=False)
    assert (real["peak_bytes"], real["state_bytes"]) == (estimate["peak_bytes"], estimate["state_bytes"])


def test_tracker_counts_shared_storage_once_and_frees():
    tracker = MemoryTracker()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        view = a[:10]  # same storage
        b = torch.empty(500, dtype=torch.float16)  # 1000 bytes
        assert tracker.current == 5000
        del b
        assert tracker.current == 4000 and tracker.peak == 5000
        del a
        assert tracker.current == 4000  # the view keeps the storage alive
        del view
        assert tracker.current == 0


def test_simulated_gpu_keeps_compressed_operands_of_cusparselts_size():
    result = estimate_memory(MemoryRequest(**SMALL, method="slope", mode="train"))
    assert result["backend"] == "cusparselt"
    # every SlopeLinear keeps W_R and W_RCᵀ compressed in bf16: 9/16 of the dense elements each
    torch.manual_seed(0)
    request = MemoryRequest(**SMALL)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True), simulate.simulated_gpu():
        model = build(request)
        from slope.convert import slope_layers
        expected = sum(2 * 2 * (layer.out_features * layer.in_features * 9 // 16) for _, layer in slope_layers(model))
    assert result["state_by_kind"]["operands"] == expected
    assert result["state_by_kind"]["gradients"] == 0  # freed by zero_grad(set_to_none=True)


def test_inference_stores_each_value_once_inside_its_operand():
    sparse = estimate_memory(MemoryRequest(**SMALL, method="slope", mode="prefill"))
    torch.manual_seed(0)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True), simulate.simulated_gpu():
        model = build(MemoryRequest(**SMALL, mode="prefill"))
        from slope.convert import slope_layers
        layers = slope_layers(model)
        operands = sum(layer.out_features * layer.in_features * 9 // 16 * 2 for _, layer in layers)
        row_bits = sum(layer.row_bits.numel() for _, layer in layers)
        assert all(layer.col_bits is None for _, layer in layers)  # M_C is for the backward only
        dense_params = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                           if not any(n.startswith(name + ".") for name, _ in layers))
    kinds = sparse["state_by_kind"]
    assert kinds["operands"] == operands  # W_R only: no W_RCᵀ at inference
    assert kinds["parameters"] == dense_params  # the kept values live inside the operands
    assert row_bits > 0 and kinds["buffers"] == 256  # M_R went to the host; left: the rotary inv_freq (64 fp32)


def test_values_really_move_into_the_operand_on_the_emulated_library():
    # real tensors on the CPU, the 2:4 path with its compressed buffers (the emulated library)
    from slope import SlopeConfig, SlopeLinear, for_inference

    torch.manual_seed(0)
    layer = SlopeLinear(64, 32, config=SlopeConfig(backend="emulated")).to(torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    expected = x @ layer.dense_weight().t() + layer.bias
    before_dense = layer.dense_weight().clone()
    for_inference(layer)
    with torch.no_grad():
        first = layer(x)
        (placement,) = layer.runtime.placements()
        (operand,) = [t for t in placement.store.tensors()]  # the compressed W_R: values and metadata
        assert layer.weight.untyped_storage().data_ptr() == operand.untyped_storage().data_ptr()
        second = layer(x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected, rtol=2**-7, atol=1e-2)
    assert placement.store.rebuilds["output"] == 1  # moving the values did not make the operand stale
    # the layer still is what it was: its dense weight, and training again from it
    torch.testing.assert_close(layer.dense_weight(), before_dense, rtol=0, atol=0)
    layer.weight.requires_grad_(True)
    layer.train()
    layer(x).float().sum().backward()
    assert layer.weight.grad.shape == layer.weight.shape and layer.col_bits is not None


def test_values_move_into_the_operand_with_adapters_too():
    # adapter inference takes its own path (fused or two-path); it stores the values once as well
    from slope import SlopeConfig, SlopeLinear, for_inference

    torch.manual_seed(0)
    layer = SlopeLinear(64, 32, config=SlopeConfig(backend="emulated")).to(torch.bfloat16)
    for p in layer.add_adapter(4):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    for_inference(layer)
    with torch.no_grad():
        got = layer(x)
    (placement,) = layer.runtime.placements()
    assert layer.weight.untyped_storage().data_ptr() == placement.store.tensors()[0].untyped_storage().data_ptr()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_floor_arithmetic_by_hand():
    # one SlopeLinear (out 64, in 128) and nothing else, training with fp32 weights under bf16 autocast
    from slope import SlopeConfig, SlopeLinear

    layer = SlopeLinear(128, 64, bias=False, config=SlopeConfig())
    request = MemoryRequest(precision="bf16-autocast")
    kept = 64 * 128 // 2
    operand = 64 * 128 * 9 // 16 * 2  # bytes of one compressed bf16 operand
    masks = 2 * 64 * 128 // 8  # M_R and M_C at one bit per position
    assert floor_bytes(layer, request) == kept * 12 + 2 * operand + masks
    assert floor_bytes(layer, MemoryRequest(mode="prefill")) == operand


def test_dense_and_slope_side_by_side_and_bad_requests():
    result = compare(MemoryRequest(**SMALL, mode="decode"))
    assert result["ratios"]["state_bytes"] < 1
    assert result["slope"]["state_by_kind"]["kv cache"] == result["dense"]["state_by_kind"]["kv cache"] > 0
    with pytest.raises(EstimateError, match="mode 'fast' is not one of train, prefill, decode"):
        estimate_memory(mode="fast")
    with pytest.raises(EstimateError, match="batch must be a positive integer, got 0"):
        estimate_memory(batch=0)


def test_command_line_table_json_and_one_line_errors(tmp_path):
    run = [sys.executable, "-m", "slope", "memory", "default", "--layers", "1", "--batch", "1", "--seq-len", "32"]
    done = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"dense", "slope", "ratios"} and result["slope"]["backend"] == "cusparselt"
    table = subprocess.run([*run, "--mode", "prefill"], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "floor of the state" in table.stdout and "operands" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "slope", "memory", "--precision", "fp8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "precision 'fp8' is not one of" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = subprocess.run([sys.executable, "-m", "slope", "memory", str(tmp_path / "nope.json")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.json" in missing.stderr and "Traceback" not in missing.stderr


def test_fsdp_estimate_is_per_rank_through_a_fake_process_group():
    whole = estimate_memory(MemoryRequest(**SMALL))
    ranks = estimate_memory(MemoryRequest(**SMALL, parallel="fsdp", world=4))
    w, r = whole["state_by_kind"], ranks["state_by_kind"]
    # parameters and AdamW's moments are sharded (dim 0 split in 4; every dim 0 here divides by 4); its
    # step counters (one fp32 scalar per parameter tensor: embedding, final norm, 2 x (7 linears + 2
    # norms) = 20) are whole on every rank
    steps = 20 * 4
    assert r["parameters"] * 4 == w["parameters"]
    assert (r["optimizer"] - steps) * 4 == w["optimizer"] - steps
    # ... the compressed operands and masks are built from the gathered values on every rank
    assert r["operands"] == w["operands"] and r["buffers"] == w["buffers"]
    assert r["temporaries"] == 0  # the gathered parameters are freed after backward
    assert ranks["peak_bytes"] < whole["peak_bytes"]
    with pytest.raises(EstimateError, match="training only"):
        estimate_memory(MemoryRequest(**SMALL, mode="prefill", parallel="fsdp", world=2))
