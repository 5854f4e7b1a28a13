"""The CUDA 2:4 code path end to end on a CPU, through the emulated library (`backend="emulated"`).

The emulated library compresses like cuSPARSELt (kept values row-major, then metadata from the
mask) and multiplies exactly, so everything around the library calls (index maps, in-place
refreshes, column-mask steps, dense fallbacks, fused adapter inference) runs here against the
reference path; tests/gpu/ runs the same paths on the real kernels.
"""

import json

import pytest
import torch
from _backend_helpers import paired_layers
from transformers import GPT2Config, GPT2LMHeadModel

import slope
from slope import SlopeConfig
from slope.backends.numerics import rel_error, tolerance
from slope.cli import main


@pytest.mark.parametrize("interval", [1, 3])
def test_training_matches_reference(interval):
    ref, sparse = paired_layers(interval)
    opts = [slope.track_steps(torch.optim.AdamW(layer.parameters(), lr=1e-2)) for layer in (ref, sparse)]
    for step in range(5):
        x = torch.randn(2, 7, 64, dtype=torch.float64)
        outs = []
        for layer, opt in zip((ref, sparse), opts, strict=True):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            (y.square().sum() + y.sum()).backward()
            outs.append((y.detach(), xi.grad, layer.weight.grad.clone()))
            opt.step()
            opt.zero_grad()
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"step {step}")
    assert torch.equal(ref.col_bits, sparse.col_bits)
    (placement,) = sparse.runtime.placements()
    assert placement.backend.name == "emulated" and placement.backend.inplace
    rebuilds = placement.store.rebuilds
    assert rebuilds["output"] == 1 and rebuilds["output_inplace"] == 4
    # M_C refreshed at every step, or at steps 0 and 3 with in-place refreshes through the index map
    assert (rebuilds["grad_input"], rebuilds["grad_input_inplace"]) == ((5, 0) if interval == 1 else (2, 3))


def test_no_double_prune_keeps_grad_input_dense():
    ref, sparse = paired_layers(double_prune=False)
    x = torch.randn(6, 64, dtype=torch.float64, requires_grad=True)
    sparse(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    (placement,) = sparse.runtime.placements()
    assert placement.backend.plan.sparse_grad_input  # the plan allows it, the missing M_C does not
    assert placement.store.rebuilds["grad_input"] == 1 and placement.store.rebuilds["grad_input_inplace"] == 0


def tiny_gpt2(dtype):
    # GPT-2 rather than LLaMA: LLaMA's RMSNorm computes in float32 whatever the model's dtype, which
    # would blur a float64 comparison to float32 precision
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(dtype)


def train_pair(backend_dtype, autocast: bool, steps=3, interval=2):
    """A tiny GPT-2 sparsified twice (reference / emulated), trained side by side on the same batches."""
    models = {}
    for backend in ("reference", "emulated"):
        model = tiny_gpt2(backend_dtype)
        slope.sparsify(model, SlopeConfig(backend=backend, backward_mask_interval=interval))
        models[backend] = model
    opts = {name: slope.track_steps(torch.optim.AdamW(m.parameters(), lr=1e-3)) for name, m in models.items()}
    history = []
    for step in range(steps):
        ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(step))
        record = {}
        for name, model in models.items():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            record[name] = (out.logits.detach().float(), grads)
            opts[name].step()
            opts[name].zero_grad()
        history.append(record)
    return models, history


def test_sparsified_model_trains_exactly_like_the_reference_in_float64():
    models, history = train_pair(torch.float64, autocast=False)
    for step, record in enumerate(history):
        (logits_ref, grads_ref), (logits, grads) = record["reference"], record["emulated"]
        torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-10, msg=f"step {step}")
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=0, atol=1e-10, msg=f"{name} step {step}")
    summary = slope.backends.backend_summary(slope.slope_layers(models["emulated"]))
    assert summary.startswith("slope backends: emulated x") and summary.endswith("dense fallbacks: none")


def test_sparsified_model_under_bf16_autocast_stays_within_the_bf16_tolerance():
    _, history = train_pair(torch.float32, autocast=True)
    tol = tolerance(torch.bfloat16)
    for step, record in enumerate(history):
        (logits_ref, grads_ref), (logits, grads) = record["reference"], record["emulated"]
        assert rel_error(logits, logits_ref) <= tol, f"logits step {step}"
        for name in grads:
            assert rel_error(grads[name], grads_ref[name]) <= tol, f"{name} step {step}"


# ---- slope info ---------------------------------------------------------------------------------


def test_info_command_on_cpu(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference: works" in out and "emulated: works" in out
    assert "cusparselt: unavailable" in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["reference"] is None and isinstance(data["backends"]["cusparselt"], str)
    assert data["backends"]["emulated"] is None


def test_info_names_a_bad_device(capsys):
    assert main(["info", "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a device (expected auto, cpu, cuda, cuda:N or mps)" in capsys.readouterr().err
