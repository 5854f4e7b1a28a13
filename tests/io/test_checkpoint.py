"""Training checkpoints (slope.io.checkpoint): the atomic writer, the one resolver, the one format check,
and the one loader that rebuilds the model from the files alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from _export_fixtures import logits, reseal, tiny_model, write_training_checkpoint
from safetensors.torch import load_file, save_file

import slope
from slope.cli import main
from slope.io import checkpoint
from slope.io.format import CHECKPOINT_FORMAT, FormatError
from slope.io.load import load, load_tokenizer

STEP_FILES = {"model.safetensors", "config.json", "slope.json", "tokenizer", "trainer_state.json",
              "trainer_state.safetensors", "config.toml", "manifest.json"}


def _method_info(model) -> dict:
    """What `slope train`'s SLoPe method records (slope.train.methods.SlopeMethod.checkpoint_info)."""
    layers = slope.slope_layers(model)
    return {"method": "slope", "slope_config": layers[0][1].config.to_dict(),
            "adapters": any(layer.rank for _, layer in layers), "adapter_rank": None}


def _save(run_dir, step, model, tokenizer, keep_last=3):
    return checkpoint.save_checkpoint(run_dir, step, model, tokenizer, _method_info(model),
                                      "[train]\nseq_len = 32\n", {"step": step}, keep_last)


# ---- the writer ---------------------------------------------------------------------------------


def test_save_checkpoint_layout_latest_and_keep_last(tmp_path, tokenizer):
    model = tiny_model("llama")
    for step in (2, 4, 6):
        _save(tmp_path, step, model, tokenizer, keep_last=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    assert (root / "latest").read_text() == "step_00000006\n"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]  # no temporaries
    assert {p.name for p in (root / "step_00000006").iterdir()} == STEP_FILES
    info = checkpoint.read_info(root / "step_00000006")
    assert info["format"] == CHECKPOINT_FORMAT and info["step"] == 6 and info["method"] == "slope"
    assert checkpoint.load_trainer_state(root / "step_00000006") == {"step": 6}
    # the same step written again (after a resume) replaces it in place
    _save(tmp_path, 6, model, tokenizer, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]


# ---- the one resolver -------------------------------------------------------------------------------


def _fake_run(run_dir, steps, latest=None):
    """Checkpoint directories that only the resolver looks at (slope.json marks one complete)."""
    for step in steps:
        ckpt = run_dir / "checkpoints" / checkpoint.step_dir_name(step)
        ckpt.mkdir(parents=True)
        (ckpt / "slope.json").write_text("{}")
    if latest is not None:
        (run_dir / "checkpoints" / "latest").write_text(latest + "\n")
    return run_dir


def test_resolver_follows_latest(tmp_path):
    run = _fake_run(tmp_path / "run", [4, 8], latest="step_00000004")  # e.g. a run rolled back by hand
    assert checkpoint.resolve_checkpoint(run) == run / "checkpoints" / "step_00000004"


def test_resolver_takes_a_checkpoint_directory_as_itself(tmp_path):
    run = _fake_run(tmp_path / "run", [4, 8], latest="step_00000008")
    ckpt = run / "checkpoints" / "step_00000004"
    assert checkpoint.resolve_checkpoint(ckpt) == ckpt
    assert checkpoint.resolve_checkpoint(str(ckpt)) == ckpt


@pytest.mark.parametrize("latest", [None, "step_00000012", ""], ids=["absent", "stale", "empty"])
def test_resolver_falls_back_to_the_newest_complete_checkpoint(tmp_path, latest):
    run = _fake_run(tmp_path / "run", [4, 8], latest=latest)
    # neither an unfinished write nor a directory without slope.json counts
    (run / "checkpoints" / ".tmp-step_00000016").mkdir()
    (run / "checkpoints" / "step_00000016").mkdir()
    assert checkpoint.resolve_checkpoint(run) == run / "checkpoints" / "step_00000008"


def test_resolver_refuses_missing_paths_and_runs_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-here does not exist"):
        checkpoint.resolve_checkpoint(tmp_path / "nothing-here")
    (tmp_path / "empty-run" / "checkpoints" / "step_00000002").mkdir(parents=True)  # never completed
    with pytest.raises(FileNotFoundError, match=r"empty-run is neither a checkpoint directory"):
        checkpoint.resolve_checkpoint(tmp_path / "empty-run")


def test_every_reader_resolves_a_run_the_same_way(tmp_path, tokenizer, ids):
    """load, load_tokenizer, load_checkpoint and `slope eval` all read the checkpoint `latest` names."""
    run = tmp_path / "run"
    older, newer = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    _save(run, 4, older, tokenizer)
    _save(run, 8, newer, tokenizer)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    assert torch.equal(logits(load(run, device="cpu", backend="reference"), ids), logits(older, ids))
    model, _, info = checkpoint.load_checkpoint(run)
    assert info["step"] == 4 and torch.equal(logits(model, ids), logits(older, ids))
    assert load_tokenizer(run).get_vocab() == tokenizer.get_vocab()


# ---- the one format check --------------------------------------------------------------------------


def test_read_info_refuses_a_newer_format_naming_the_file(tmp_path):
    run = _fake_run(tmp_path / "run", [4], latest="step_00000004")
    ckpt = run / "checkpoints" / "step_00000004"
    (ckpt / "slope.json").write_text(json.dumps({"format": CHECKPOINT_FORMAT + 1, "slope_config": None}))
    with pytest.raises(FormatError) as err:
        checkpoint.read_info(ckpt)
    message = str(err.value)
    assert str(ckpt / "slope.json") in message and f"format {CHECKPOINT_FORMAT + 1}" in message
    assert "upgrade slope" in message and "\n" not in message


@pytest.mark.parametrize(("content", "message"), [
    ("{", "cannot read the checkpoint info"),
    ("[1]", "expected a JSON object"),
    (json.dumps({"slope_config": None}), "invalid format None"),
    (json.dumps({"format": "1", "slope_config": None}), "invalid format '1'"),
    (json.dumps({"format": 2, "slope_config": [2, 4]}), "slope_config must be an object or null"),
])
def test_read_info_refuses_damaged_info(tmp_path, content, message):
    (tmp_path / "slope.json").write_text(content)
    with pytest.raises(FormatError, match=message):
        checkpoint.read_info(tmp_path)


# ---- the one loader ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.37], ids=["1/r", "configured"])
def test_adapters_come_back_with_each_layers_rank_and_scale(tmp_path, tokenizer, ids, scale):
    """Ranks differ per layer (the rank rule gives each shape its own); each comes from its mask_state,
    and the scale is re-derived as SlopeLinear.add_adapter derives it in training: 1/r, or the
    config's adapter_scale when set."""
    model = tiny_model("llama", cfg=slope.SlopeConfig(backend="reference", adapter_scale=scale))
    for i, (_, layer) in enumerate(slope.slope_layers(model)):
        for p in layer.add_adapter(1 + i % 3):
            with torch.no_grad():
                p.normal_(0, 0.5)
    _save(tmp_path / "run", 6, model, tokenizer)
    loaded, loaded_tokenizer, info = checkpoint.load_checkpoint(tmp_path / "run")
    want = [(layer.rank, layer.adapter_scale) for _, layer in slope.slope_layers(model)]
    assert [(layer.rank, layer.adapter_scale) for _, layer in slope.slope_layers(loaded)] == want
    assert len({rank for rank, _ in want}) == 3
    assert {s for _, s in want} == ({1.0, 0.5, 1 / 3} if scale is None else {0.37})
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert not loaded.training and info["adapters"] is True
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_an_unknown_method_loads_by_the_shape_of_its_files(tmp_path, tokenizer, ids):
    """`method` is a label: a checkpoint of another method with a slope_config loads as a SLoPe model."""
    model = tiny_model("gpt2", adapters=True)
    run = write_training_checkpoint(tmp_path / "run", model, tokenizer)
    ckpt = checkpoint.resolve_checkpoint(run)
    info = json.loads((ckpt / "slope.json").read_text())
    (ckpt / "slope.json").write_text(json.dumps({**info, "method": "some-future-baseline"}))
    reseal(ckpt)
    loaded, _, loaded_info = checkpoint.load_checkpoint(run)
    assert loaded_info["method"] == "some-future-baseline"
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_loading_needs_no_training_code(tmp_path, tokenizer):
    run = write_training_checkpoint(tmp_path / "run", tiny_model("llama", adapters=True), tokenizer)
    code = (
        "import sys; sys.modules['slope.train'] = None; sys.modules['slope.cli'] = None\n"  # importing them fails
        "from slope.io.checkpoint import load_checkpoint\n"
        f"model, _, info = load_checkpoint({str(run)!r})\n"
        "print(info['method'], type(model).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["slope", "LlamaForCausalLM"]


# ---- damaged checkpoints: FormatError, one line, naming the file ----------------------------------------


def _edit_info(ckpt, change):
    info = json.loads((ckpt / "slope.json").read_text())
    change(info)
    (ckpt / "slope.json").write_text(json.dumps(info))


def _edit_config(ckpt, change):
    config = json.loads((ckpt / "config.json").read_text())
    change(config)
    (ckpt / "config.json").write_text(json.dumps(config))


def _drop_tensor(ckpt, name):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors[name]
    save_file(tensors, ckpt / "model.safetensors")


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


LAYER = "model.layers.1.self_attn.q_proj"

DAMAGE = {
    "newer format": (
        lambda c: _edit_info(c, lambda i: i.update(format=CHECKPOINT_FORMAT + 1)),
        rf"slope\.json has format {CHECKPOINT_FORMAT + 1}.*upgrade slope",
    ),
    "not json": (lambda c: (c / "slope.json").write_text("{"), r"slope\.json: cannot read"),
    "adapters flag disagrees": (lambda c: _edit_info(c, lambda i: i.update(adapters=False)), "does not fit"),
    "unknown slope_config key": (
        lambda c: _edit_info(c, lambda i: i["slope_config"].update(bogus=1)), "invalid slope_config",
    ),
    "dense config, sparse weights": (lambda c: _edit_info(c, lambda i: i.update(slope_config=None)), "does not fit"),
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), r"model\.safetensors does not fit"),
    "config shape mismatch": (lambda c: _edit_config(c, lambda m: m.update(hidden_size=128)), "does not fit"),
    "missing mask_state": (lambda c: _drop_tensor(c, f"{LAYER}.mask_state"), "does not fit"),
    "missing weights": (lambda c: (c / "model.safetensors").unlink(), r"model\.safetensors is missing"),
    "missing config": (lambda c: (c / "config.json").unlink(), r"config\.json is missing"),
    "missing tokenizer": (lambda c: shutil.rmtree(c / "tokenizer"), "tokenizer is missing"),
}
# found by the manifest, before the loader's own checks: a file it lists is gone
UNSEALED = {"missing weights", "missing config"}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoints_fail_clearly(tmp_path, tokenizer, case):
    run = write_training_checkpoint(tmp_path / "run", tiny_model("llama", adapters=True), tokenizer)
    damage, message = DAMAGE[case]
    damage(run / "checkpoints" / "step_00000010")
    if case not in UNSEALED:
        reseal(run / "checkpoints" / "step_00000010")  # past the checksums, to the loader's own checks
    with pytest.raises(FormatError, match=message) as err:
        checkpoint.load_checkpoint(run)
    assert "\n" not in str(err.value)
    with pytest.raises(FormatError, match=message):
        load(run, device="cpu")  # slope.load reads checkpoints through the same loader


def test_cli_reports_a_damaged_checkpoint_in_one_line(tmp_path, tokenizer, capsys):
    run = write_training_checkpoint(tmp_path / "run", tiny_model("llama", adapters=True), tokenizer)
    _truncate(run / "checkpoints" / "step_00000010" / "model.safetensors")
    reseal(run / "checkpoints" / "step_00000010")
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 2
    assert main(["eval", str(run), "milton"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["slope export", "slope eval"]
    assert all("does not fit" in line for line in lines)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n", 5, r"invalid slope_config \(ValueError: SlopeConfig.n=5 is invalid"),
    ("typo", 1, r"invalid slope_config \(TypeError: .*typo"),
])
def test_read_info_refuses_an_invalid_slope_config(tmp_path, field, value, message):
    # load and resume both read slope.json through read_info, so both refuse what SlopeConfig refuses
    from slope.io.checkpoint import read_info

    info = {"format": 2, "method": "slope", "slope_config": {field: value}, "adapters": False, "step": 1}
    (tmp_path / "slope.json").write_text(json.dumps(info))
    with pytest.raises(FormatError, match=message):
        read_info(tmp_path)
