"""The one step signal: `slope.track_steps(optimizer)` counts every optimizer step of a SlopeLinear's values.

Real optimizers in float64: fused and foreach AdamW, SGD with momentum; gradient accumulation; a step
the GradScaler skips; DDP and FSDP2 on two gloo ranks; the warning when nothing signals the steps.

Run as a script under torchrun (`python -m torch.distributed.run --nproc_per_node 2
tests/core/test_step_signal.py OUT`), this file is the worker of the two-rank tests.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from slope import SlopeConfig, SlopeLinear, track_steps
from slope.masks import nm_bits, nm_mask

OPTIMIZERS = {
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
}


def make_layer(interval: int = 1, backend: str = "reference") -> SlopeLinear:
    """A (out=32, in=64) float64 layer; "emulated" keeps compressed 2:4 operands between steps, which
    only a step signal (or an edit moving the values' version) refreshes."""
    torch.manual_seed(0)
    config = SlopeConfig(backward_mask_interval=interval, backend=backend)
    return SlopeLinear.from_dense(nn.Linear(64, 32, dtype=torch.float64), config)


def expected_output(layer: SlopeLinear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.dense_weight().t() + layer.bias.detach()


def untracked_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "track_steps" in str(w.message)]


def grad_scaler() -> torch.amp.GradScaler:
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0**8)
    except (AttributeError, RuntimeError, TypeError) as err:  # older torch: CUDA only
        pytest.skip(f"this torch has no CPU GradScaler ({err})")


# ---- one process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("micro_steps", [1, 3])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_step_counts_once_and_the_operands_follow_the_values(name, micro_steps):
    # fused AdamW writes the values without moving their version counter: the compressed operands
    # must follow the count, or the forward would multiply with the values of an earlier step
    layer = make_layer(backend="emulated")
    opt = track_steps(OPTIMIZERS[name](layer.parameters()))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(4):
            for _ in range(micro_steps):  # gradient accumulation: several backwards, one step
                x = torch.randn(6, 64, dtype=torch.float64)
                y = layer(x)
                torch.testing.assert_close(y, expected_output(layer, x), rtol=0, atol=1e-12, msg=f"step {step}")
                y.square().sum().backward()
                assert layer.mask_steps == step
            opt.step()
            opt.zero_grad()
            assert layer.mask_steps == step + 1
    assert untracked_warnings(record) == []
    (placement,) = layer.runtime.placements()
    assert placement.store.rebuilds["output"] == 1 and placement.store.rebuilds["output_inplace"] == 3  # once per step


def test_fused_adamw_needs_no_zero_grad():
    # the old rule "fused optimizers only with zero_grad(set_to_none=True)" is gone: the hook counts
    layer = make_layer(backend="emulated")
    opt = track_steps(OPTIMIZERS["adamw-fused"](layer.parameters()))
    for step in range(3):
        x = torch.randn(6, 64, dtype=torch.float64)
        y = layer(x)
        torch.testing.assert_close(y, expected_output(layer, x), rtol=0, atol=1e-12)
        y.sum().backward()  # gradients accumulate across steps: never cleared
        opt.step()
        assert layer.mask_steps == step + 1


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_column_mask_refreshes_exactly_every_interval(name, interval):
    layer = make_layer(interval=interval)
    opt = track_steps(OPTIMIZERS[name](layer.parameters()))
    w_r_at = {}
    for step in range(7):
        w_r_at[step] = layer.dense_weight()
        x = torch.randn(6, 64, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(6, 32, dtype=torch.float64)
        layer(x).backward(dy)
        computed_at = (step // interval) * interval
        assert layer.column_mask_step == computed_at, f"step {step}"
        assert torch.equal(layer.col_bits, nm_bits(w_r_at[computed_at], 2, 4, dim=0))
        col = nm_mask(w_r_at[computed_at], 2, 4, dim=0)  # M_C of the values it was computed from
        torch.testing.assert_close(x.grad, dy @ (w_r_at[step] * col), rtol=0, atol=1e-12)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["adamw-fused", "adamw-foreach"])
def test_a_step_the_grad_scaler_skips_is_not_counted_and_refreshes_nothing(name):
    # foreach: the scaler does not call step() at all; fused: it calls step() with `found_inf`, and the
    # kernel skips the update itself
    layer = make_layer(backend="emulated")
    opt = track_steps(OPTIMIZERS[name](layer.parameters()))
    scaler = grad_scaler()
    rebuilds = []  # the operand cache's counts after each forward
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(3):
            x = torch.randn(6, 64, dtype=torch.float64)
            y = layer(x)
            torch.testing.assert_close(y, expected_output(layer, x), rtol=0, atol=1e-12)
            rebuilds.append(dict(layer.runtime.placements()[0].store.rebuilds))
            scaler.scale(y.square().sum()).backward()
            if step == 1:
                layer.weight.grad[0, 0] = float("inf")
            values = layer.weight.detach().clone()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            assert torch.equal(layer.weight, values) == (step == 1)
            assert layer.mask_steps == (1 if step < 2 else 2)
    assert rebuilds[1] != rebuilds[0], "a step refreshes the operands"
    assert rebuilds[2] == rebuilds[1], "a skipped step refreshed the operands"
    assert scaler.get_scale() == 2.0**7  # halved once: the skip really happened
    assert untracked_warnings(record) == []  # a skipped step of a tracked optimizer is no missing signal


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_step_without_a_signal_warns_at_the_next_forward(name):
    layer = make_layer(backend="emulated")
    opt = OPTIMIZERS[name](layer.parameters())  # not tracked
    x = torch.randn(6, 64, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):  # accumulating: no step yet, nothing to warn about
            layer(x).square().sum().backward()
        assert untracked_warnings(record) == []
    opt.step()
    opt.zero_grad()
    with pytest.warns(UserWarning, match=r"no optimizer step was signalled: call slope\.track_steps\(optimizer\)"):
        y = layer(x)
    # the values are read again (a fused step left their version still); the step is not counted
    torch.testing.assert_close(y, expected_output(layer, x), rtol=0, atol=1e-12)
    assert layer.mask_steps == 0
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer(x)  # once per unsignalled step
    assert untracked_warnings(record) == []


def test_an_edit_under_no_grad_is_no_step_and_is_seen_by_the_operands():
    layer = make_layer(backend="emulated")
    x = torch.randn(6, 64, dtype=torch.float64)
    layer(x)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            layer.weight.mul_(-2.0)
        torch.testing.assert_close(layer(x), expected_output(layer, x), rtol=0, atol=1e-12)
    assert untracked_warnings(record) == [] and layer.mask_steps == 0


def test_groups_added_later_count_and_registering_twice_counts_once():
    layer, unused = make_layer(), make_layer()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    assert track_steps(opt) is opt and track_steps(opt) is opt
    opt.add_param_group({"params": [layer.weight, unused.weight]})  # e.g. layers a prune made mid-run
    for step in range(3):
        layer(torch.randn(6, 64, dtype=torch.float64)).sum().backward()
        opt.step()
        opt.zero_grad()
        assert layer.mask_steps == step + 1
    assert unused.mask_steps == 0  # in the optimizer, but no gradient: its values did not change


def test_a_copy_of_a_layer_counts_its_own_steps_and_warns_on_its_own():
    original = make_layer()
    layer = copy.deepcopy(original)  # e.g. a model copied to train a variant of it
    opt = track_steps(OPTIMIZERS["adamw-fused"](layer.parameters()))
    for _ in range(2):
        layer(torch.randn(6, 64, dtype=torch.float64)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert (layer.mask_steps, original.mask_steps) == (2, 0)
    untracked = OPTIMIZERS["adamw-fused"](original.parameters())
    original(torch.randn(6, 64, dtype=torch.float64)).sum().backward()
    untracked.step()
    untracked.zero_grad()
    with pytest.warns(UserWarning, match="track_steps"):
        original(torch.randn(6, 64, dtype=torch.float64))


def test_track_steps_refuses_what_is_not_an_optimizer():
    with pytest.raises(TypeError, match=r"track_steps: expected a torch\.optim\.Optimizer, got list"):
        track_steps([])


# ---- two ranks -----------------------------------------------------------------------------------

DIST_STEPS = 5
DIST_INTERVAL = 2


def two_layer_model() -> nn.Sequential:
    torch.manual_seed(0)
    cfg = SlopeConfig(backward_mask_interval=DIST_INTERVAL)
    return nn.Sequential(SlopeLinear.from_dense(nn.Linear(32, 64, dtype=torch.float64), cfg), nn.Tanh(),
                         SlopeLinear.from_dense(nn.Linear(64, 32, dtype=torch.float64), cfg))


def rank_batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(100 * step + rank))


def train_and_record(model: nn.Module, forward: nn.Module, optimizer, batches: list[torch.Tensor]) -> dict:
    """Per step, each layer's (mask_steps, column_mask_step, M_C bits) after it; the final values."""
    layers = [m for m in model if isinstance(m, SlopeLinear)]
    steps = []
    for x in batches:
        forward(x).square().mean().backward()  # the mean over the global batch: what DDP/FSDP average
        optimizer.step()
        optimizer.zero_grad()
        steps.append([[layer.mask_steps, layer.column_mask_step, layer.col_bits.tolist()] for layer in layers])
    values = [layer.weight.full_tensor() if hasattr(layer.weight, "full_tensor") else layer.weight for layer in layers]
    return {"steps": steps, "values": [v.detach().tolist() for v in values]}


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for mode in ("ddp", "fsdp"):
        model = two_layer_model()
        if mode == "ddp":
            forward = DistributedDataParallel(model, forward_sync_buffers=False)
        else:
            for layer in model:
                if isinstance(layer, SlopeLinear):
                    fully_shard(layer)  # one unit per layer, as `slope train` shards decoder blocks
            forward = fully_shard(model)
        # FSDP2: the optimizer holds the sharded DTensors, not the weights the layers' forwards see
        optimizer = track_steps(torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True))
        results[mode] = train_and_record(model, forward, optimizer, [rank_batch(s, rank) for s in range(DIST_STEPS)])
    if rank == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """DDP and FSDP2 runs on two gloo ranks (one torchrun job), and one process with both ranks' batches."""
    from distributed.conftest import env, torchrun

    out = tmp_path_factory.mktemp("step-signal") / "ranks.json"
    done = subprocess.run([*torchrun(2), __file__, str(out)], env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = two_layer_model()
    optimizer = track_steps(torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True))
    batches = [torch.cat([rank_batch(s, 0), rank_batch(s, 1)]) for s in range(DIST_STEPS)]
    return {**json.loads(out.read_text()), "one": train_and_record(model, model, optimizer, batches)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_count_steps_and_refresh_column_masks_as_one_process(two_ranks, mode):
    got, want = two_ranks[mode], two_ranks["one"]
    for step, (layers, expected) in enumerate(zip(got["steps"], want["steps"], strict=True)):
        for layer, (steps, col_step, col_bits) in enumerate(layers):
            assert (steps, col_step) == (step + 1, (step // DIST_INTERVAL) * DIST_INTERVAL), f"layer {layer}"
            assert col_bits == expected[layer][2], f"M_C of layer {layer} at step {step}"
    for values, expected in zip(got["values"], want["values"], strict=True):
        torch.testing.assert_close(torch.tensor(values), torch.tensor(expected), rtol=0, atol=1e-10)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
