"""Compressed export and dense export: exact round trips, size, and every corruption / mismatch case."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from _export_fixtures import logits, reseal_export, tiny_config, tiny_model, write_training_checkpoint
from _tolerances import logits_atol
from safetensors.torch import load_file, save_file

import slope
from slope.cli import main
from slope.io.export import export, save_compressed
from slope.io.format import EXPORT_WEIGHTS_FILE as WEIGHTS_FILE  # the compressed export's
from slope.io.format import META_FILE, FormatError
from slope.io.load import load, load_tokenizer

# ---- exact round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("adapters", [False, True], ids=["plain", "adapters"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_export_load_identical_logits(tmp_path, tokenizer, ids, family, adapters):
    model = tiny_model(family, adapters)
    run = write_training_checkpoint(tmp_path / "run", model, tokenizer)
    out = export(run, tmp_path / "export")
    loaded = load(out, device="cpu", backend="reference")
    layers = slope.slope_layers(loaded)
    assert [n for n, _ in layers] == [n for n, _ in slope.slope_layers(model)]
    assert all(layer.rank == (4 if adapters else 0) for _, layer in layers)
    for (_, a), (_, b) in zip(slope.slope_layers(model), layers, strict=True):
        assert torch.equal(a.row_bits, b.row_bits) and torch.equal(a.weight, b.weight)
        assert (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias, b.bias))
        if adapters:  # the fixture's scale is 0.37, not the default 1/r
            assert b.adapter_scale == a.adapter_scale == 0.37
            assert torch.equal(a.adapter_a, b.adapter_a) and torch.equal(a.adapter_b, b.adapter_b)
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    # the training checkpoint itself loads to the same model
    assert torch.equal(logits(model, ids), logits(load(run, device="cpu", backend="reference"), ids))
    assert load_tokenizer(out)("From fairest")["input_ids"] == tokenizer("From fairest")["input_ids"]


def _stored(model, dtype):
    """What an export in `dtype` must give back: every tensor of the state_dict except the training
    counters and the column-mask cache (not stored: rebuilt on the first training step), cast."""
    return {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in model.state_dict().items() if not k.endswith((".mask_state", ".col_bits"))
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_export_gives_back_every_tensor_and_each_layers_adapter_scale(tmp_path, family, dtype):
    """Biases and adapters come back EQUAL (in the stored dtype), not only to close logits; each layer's
    own adapter scale comes back, not one the config or the rank would give."""
    model = tiny_model(family, adapters=True, per_layer_scales=True)
    layers = slope.slope_layers(model)
    scales = [layer.adapter_scale for _, layer in layers]
    assert len(set(scales)) == len(scales) and not {0.37, 0.25} & set(scales)  # none a loader could derive
    assert all(layer.bias is not None and layer.bias.abs().min() > 0 for _, layer in layers)
    out = save_compressed(model, tmp_path / "e", dtype=dtype)
    loaded = load(out, device="cpu", dtype=None, backend="reference")
    assert [layer.adapter_scale for _, layer in slope.slope_layers(loaded)] == scales
    want, got = _stored(model, dtype), _stored(loaded, dtype)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_stores_a_known_layer_as_the_format_says(tmp_path, family):
    """One layer's row 0 set by hand: the stored values and position bytes are the ones docs/export.md
    specifies, for nn.Linear (weight (out, in)) and GPT-2's Conv1D (weight stored (in, out))."""
    from transformers import AutoModelForCausalLM

    name = {"llama": "model.layers.1.self_attn.o_proj", "gpt2": "transformer.h.1.attn.c_proj"}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    # logical row 0 (output 0), groups of 4 along `in`: kept positions (0,1) (0,2) (0,3) (1,2) (1,3)
    # (2,3) (0,2) (2,3) -> codes 0 1 2 3 4 5 1 5 -> bytes 0x88 0xC6 0xA6 (derived in test_packing.py);
    # kept values 1, -2, 3, -4, ... in column order, the dropped ones (0.01) smaller in magnitude
    kept = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (0, 2), (2, 3)]
    row = torch.full((64,), 0.01)
    for g, (i, j) in enumerate(kept):
        row[4 * g + i], row[4 * g + j] = 2 * g + 1, -(2 * g + 2)
    row[32:] = torch.tensor([0.0, 0.0, 0.5, 0.5] * 8)  # groups 8..15: (2,3) -> code 5 each
    with torch.no_grad():
        weight = model.get_submodule(name).weight
        (weight[0] if family == "llama" else weight[:, 0]).copy_(row)  # Conv1D: column 0 is output 0
    slope.sparsify(model, slope.SlopeConfig(backend="reference"))
    tensors = load_file(save_compressed(model, tmp_path / "e") / WEIGHTS_FILE)
    assert tensors[f"{name}.values"][0].tolist() == [
        1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0, 11.0, -12.0, 13.0, -14.0, 15.0, -16.0,
    ] + [0.5] * 16
    # 16 groups x 3 bits = 6 bytes for row 0. Groups 8..15, code 5 = 101 each, give the stream bits
    # 101101101101101101101101 (bit 0 first): byte 3 = 1+4+8+32+64 = 0x6D, byte 4 = 1+2+8+16+64+128
    # = 0xDB, byte 5 = 2+4+16+32+128 = 0xB6.
    assert tensors[f"{name}.positions"][:6].tolist() == [0x88, 0xC6, 0xA6, 0x6D, 0xDB, 0xB6]


def test_loaded_model_keeps_training(tmp_path, tokenizer, ids):
    """The column mask is not exported; it is rebuilt on the first training step."""
    model = load(save_compressed(tiny_model("llama"), tmp_path / "e", tokenizer), device="cpu")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    layer = slope.slope_layers(model)[0][1]
    assert layer.column_mask_step == 0 and layer.weight.grad is not None


def test_half_precision_export(tmp_path, tokenizer, ids):
    model = tiny_model("gpt2", adapters=True)
    out = save_compressed(model, tmp_path / "e", tokenizer, dtype=torch.float16)
    assert {t.dtype for t in load_file(out / WEIGHTS_FILE).values()} == {torch.float16, torch.uint8}
    loaded = load(out, device="cpu", dtype=torch.float32, backend="reference")
    got = logits(loaded, ids)
    # Exact: the loaded model is the original with every stored number rounded to fp16, nothing else.
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*rounded.parameters(), *rounded.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half())
    assert torch.equal(got, logits(rounded, ids))
    # Against the fp32 original only fp16 rounding may differ: fp16 keeps 11 significant bits, so each
    # stored value moves by at most 2^-11 ≈ 4.9e-4 of itself, and the fixture's logits are below 1:
    # the measured difference is 1.9e-4 at most (1.1e-3 with the former N(0, 0.5) adapters). The fp16
    # values are the same on every machine; only summation order may add, at most logits_atol (~1.6e-4,
    # tests/_tolerances.py, asserted below), so 1e-3 holds anywhere, yet scaling any one layer's kept values by 0.9
    # moves the logits by 4.3e-3 to 1.0e-2 and fails it (checked below); the former atol=5e-2 did not.
    assert 1.9e-4 + logits_atol(model, ids) < 1e-3
    torch.testing.assert_close(got, logits(model, ids), rtol=0, atol=1e-3)
    for _, layer in slope.slope_layers(loaded):
        with torch.no_grad():
            layer.weight.mul_(0.9)
        assert not torch.allclose(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-3)
        with torch.no_grad():
            layer.weight.div_(0.9)


# ---- dense export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapters", [False, True], ids=["plain", "adapters"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_export_matches_in_plain_transformers(tmp_path, tokenizer, ids, family, adapters):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, adapters)
    out = export(write_training_checkpoint(tmp_path / "run", model, tokenizer), tmp_path / "dense", dense=True)
    dense = AutoModelForCausalLM.from_pretrained(out)
    assert not slope.slope_layers(dense)
    # Same weights, different float32 rounding: plain layers run fused addmm (Conv1D on its (in, out)
    # layout), and merged W_R + s(AB)ᵀ rounds differently from adding the adapter product to the output.
    # Seen: ~2e-7; the bound on summation order (tests/_tolerances.logits_atol) is ~1.6e-4, and scaling
    # one layer's kept values by 0.99, or its adapter scale by 1.01, moves the logits by 6e-4 to 2e-3.
    assert torch.allclose(logits(dense, ids), logits(model, ids), rtol=0, atol=logits_atol(model, ids))


def test_dense_export_loads_without_slope(tmp_path, tokenizer):
    out = export(write_training_checkpoint(tmp_path / "run", tiny_model("llama"), tokenizer), tmp_path / "d", dense=True)
    code = (
        "import sys; sys.modules['slope'] = None\n"  # any import of slope now fails
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "print(m(**t('From fairest', return_tensors='pt')).logits.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1," in result.stdout


# ---- size ---------------------------------------------------------------------------------------------


def test_sparse_layers_at_most_057_of_dense_fp16(tmp_path):
    model = tiny_model("llama")
    out = save_compressed(model, tmp_path / "e", dtype=torch.float16)
    tensors = load_file(out / WEIGHTS_FILE)
    stored = dense = 0
    for name, layer in slope.slope_layers(model):
        stored += sum(tensors[f"{name}.{part}"].nbytes for part in ("values", "positions"))
        dense += layer.out_features * layer.in_features * 2
    assert stored / dense <= 0.57
    assert stored / dense == pytest.approx(0.5 + 3 / 64, abs=1e-3)  # 2 fp16 values + 3 bits per group of 4


# ---- errors, never a half-loaded model -------------------------------------------------------------


@pytest.fixture
def exported(tmp_path, tokenizer):
    return save_compressed(tiny_model("gpt2", adapters=True), tmp_path / "e", tokenizer)


def _edit_meta(path, change, reseal=True):
    """Change slope_model.json; `reseal`: and its own checksum, so the reader's checks behind it see the change."""
    meta = json.loads((path / META_FILE).read_text())
    change(meta)
    (path / META_FILE).write_text(json.dumps(meta))
    if reseal:
        reseal_export(path, relist=False)


def _rewrite_weights(path, change):
    """Rewrite the weights file and the checksums, so only the structural check can catch `change`."""
    tensors = load_file(path / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, path / WEIGHTS_FILE)
    reseal_export(path)


def _truncate(path):
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0x01
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


LAYER = "transformer.h.1.attn.c_attn"

CASES = {
    "newer format": (lambda p: _edit_meta(p, lambda m: m.update(format_version=99)), "newer than this slope reads"),
    # the metadata checksums itself: an edit is caught before any field of it is believed
    "edited metadata": (lambda p: _edit_meta(p, lambda m: m["layers"][LAYER].update(adapter_scale=100), reseal=False),
                        "fails its own SHA-256 check"),
    "edited version": (lambda p: _edit_meta(p, lambda m: m.update(format_version=1), reseal=False),
                       "fails its own SHA-256 check"),
    "added file": (lambda p: (p / "tokenizer" / "added_tokens.json").write_text("{}"), "is not listed in"),
    "not an export": (lambda p: _edit_meta(p, lambda m: m.update(format="other")), "not a slope export"),
    "truncated": (_truncate, "truncated"),
    "corrupted byte": (_flip_byte, "SHA-256"),
    "missing tokenizer file": (lambda p: (p / "tokenizer" / "tokenizer.json").unlink(), "is missing"),
    "bad json": (lambda p: (p / META_FILE).write_text("{"), "cannot read"),
    "config shape mismatch": (
        lambda p: _edit_meta(p, lambda m: m["model_config"].update(n_embd=128)), "model config builds",
    ),
    "config layer count mismatch": (
        lambda p: _edit_meta(p, lambda m: m["model_config"].update(n_layer=1)), "not a linear layer",
    ),
    "values shape": (
        lambda p: _rewrite_weights(p, lambda t: t.update({f"{LAYER}.values": t[f"{LAYER}.values"][:, :-2].clone()})),
        "values has shape",
    ),
    "positions garbage": (
        lambda p: _rewrite_weights(p, lambda t: t.update({f"{LAYER}.positions": torch.full_like(t[f"{LAYER}.positions"], 255)})),
        "codes >= C",
    ),
    "missing tensor": (lambda p: _rewrite_weights(p, lambda t: t.pop(f"{LAYER}.adapter_b")), "missing 1 tensor"),
    "extra tensor": (lambda p: _rewrite_weights(p, lambda t: t.update(extra=torch.zeros(1))), "unexpected 1 tensor"),
    "dense shape": (
        lambda p: _rewrite_weights(p, lambda t: t.update({"transformer.wpe.weight": torch.zeros(64, 64)})),
        "model config gives",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_exports_fail_clearly(exported, case):
    damage, message = CASES[case]
    damage(exported)
    with pytest.raises(FormatError, match=message):
        load(exported, device="cpu")


def test_cli_reports_bad_export_in_one_line(exported, capsys):
    _truncate(exported)
    assert main(["generate", str(exported), "--prompt", "From"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slope generate: error:") and "truncated" in err and "\n" not in err


def test_cli_export(tmp_path, tokenizer, capsys):
    run = write_training_checkpoint(tmp_path / "run", tiny_model("llama", adapters=True), tokenizer)
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--dtype", "bfloat16"]) == 0
    meta = json.loads((tmp_path / "e" / META_FILE).read_text())
    assert (meta["n"], meta["m"], meta["position_bits"], meta["dtype"]) == (2, 4, 3, "bfloat16")
    assert meta["skipped"]["lm_head"].startswith("matches skip pattern")
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 2  # exists: one clear line
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_dense_run_exports_and_loads(tmp_path, tokenizer, ids):
    """A `--method dense` run has no sparse layers; its compressed export is just the dense tensors."""
    from _export_fixtures import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    out = export(write_training_checkpoint(tmp_path / "run", model, tokenizer), tmp_path / "e")
    meta = json.loads((out / META_FILE).read_text())
    assert meta["layers"] == {} and meta["slope_config"] is None
    assert torch.equal(logits(load(out, device="cpu"), ids), logits(model, ids))


def test_reexport_compressed_as_dense_and_half(tmp_path, tokenizer, ids):
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt2", adapters=True)
    first = save_compressed(model, tmp_path / "e", tokenizer)
    assert main(["export", str(first), "--out", str(tmp_path / "d"), "--dense"]) == 0
    assert main(["export", str(first), "--out", str(tmp_path / "h"), "--dtype", "float16"]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert torch.allclose(logits(dense, ids), logits(model, ids), rtol=0, atol=logits_atol(model, ids))  # see above
    assert json.loads((tmp_path / "h" / META_FILE).read_text())["dtype"] == "float16"


def test_reexport_keeps_the_skip_list(tmp_path, tokenizer):
    model = tiny_model("llama")
    first = save_compressed(model, tmp_path / "a", tokenizer)
    loaded = load(first, device="cpu")
    assert loaded.slope_report.skipped == model.slope_report.skipped
    assert loaded.slope_report.params_after == model.slope_report.params_after
    assert loaded.slope_report.params_before == model.slope_report.params_before
    second = save_compressed(loaded, tmp_path / "b", tokenizer)
    meta_a, meta_b = (json.loads((p / META_FILE).read_text()) for p in (first, second))
    assert meta_a["skipped"] == meta_b["skipped"] and meta_a["layers"] == meta_b["layers"]
    assert meta_a["slope_config"] == meta_b["slope_config"] and meta_a["slope_config"]["backend"] == "auto"
    # same tensors (the files themselves may differ: safetensors orders its header metadata freely)
    tensors_a, tensors_b = load_file(first / WEIGHTS_FILE), load_file(second / WEIGHTS_FILE)
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
