"""Malformed files that pass the checksums (written again after the damage, as a buggy writer or an edit would
leave them) are one clean line, a FormatError naming the file and what is wrong, through the public entry
points; never a RecursionError, KeyError, TypeError or AttributeError."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _export_fixtures import reseal, reseal_export, tiny_model, write_training_checkpoint

import slope
from slope.cli import main
from slope.io import checkpoint
from slope.io.format import FormatError

STEP = "checkpoints/step_00000004"
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
NESTED = '{"a":' * 150 + "1" + "}" * 150  # parses, but deeper than any file slope writes


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def run(tmp_path, model, tokenizer):
    return write_training_checkpoint(tmp_path / "run", model, tokenizer, step=4)


def _one_line(read, path, message: str) -> None:
    with pytest.raises(FormatError, match=message) as err:
        read(path)
    assert "\n" not in str(err.value)


def _check_fails(path, message: str, capsys) -> None:
    capsys.readouterr()
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert re.search(message, out), out


# ---- JSON nested too deep -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [DEEP, NESTED], ids=["recursion", "depth"])
@pytest.mark.parametrize(("name", "what"), [("slope.json", "the checkpoint info"), ("config.json", "the model config"),
                                            ("trainer_state.json", "the trainer state")])
def test_a_checkpoint_json_nested_too_deep_is_one_line(run, capsys, name, what, text):
    ckpt = run / STEP
    (ckpt / name).write_text(text)
    reseal(ckpt)
    message = rf"{ckpt / name}: cannot read {what} \(JSON nested more than 100 levels deep\)"
    readers = []
    if name != "config.json":  # a resume builds its model from the run's config.toml
        readers.append(checkpoint.load_for_resume)
    if name != "trainer_state.json":  # loading a model does not read the trainer state
        readers += [checkpoint.load_checkpoint, lambda p: slope.load(p, device="cpu")]
    for read in readers:
        _one_line(read, run, message)
    _check_fails(run, message, capsys)


def test_a_manifest_nested_too_deep_is_one_line(run, capsys):
    (run / STEP / "manifest.json").write_text(DEEP)
    message = r"manifest\.json: cannot read the checkpoint manifest \(JSON nested more than 100 levels deep\)"
    for read in (checkpoint.load_checkpoint, checkpoint.load_for_resume, lambda p: slope.load(p, device="cpu")):
        _one_line(read, run, message)
    _check_fails(run, message, capsys)


def test_export_metadata_nested_too_deep_is_one_line(tmp_path, model, capsys):
    out = slope.save_compressed(model, tmp_path / "export")
    (out / "slope_model.json").write_text(DEEP)
    message = r"slope_model\.json: cannot read the export metadata \(JSON nested more than 100 levels deep\)"
    _one_line(lambda p: slope.load(p, device="cpu"), out, message)
    _check_fails(out, message, capsys)


def test_a_resealed_export_with_a_deep_model_config_is_one_line(tmp_path, model):
    out = slope.save_compressed(model, tmp_path / "export")
    text = (out / "slope_model.json").read_text().replace('"rope_type": "default"', f'"rope_type": {NESTED}')
    (out / "slope_model.json").write_text(text)
    reseal_export(out)
    _one_line(lambda p: slope.load(p, device="cpu"), out, r"nested more than 100 levels deep")


def test_a_huggingface_config_nested_too_deep_is_one_line(tmp_path, model, capsys):
    model.save_pretrained(tmp_path / "hf")  # a sparsified model's folder: slope reads its config.json itself
    (tmp_path / "hf" / "config.json").write_text(DEEP)
    _one_line(lambda p: slope.load(p, device="cpu"), tmp_path / "hf",
              r"config\.json: cannot read the model config \(JSON nested more than 100 levels deep\)")
    _check_fails(tmp_path / "hf", "nested more than 100 levels deep", capsys)


@pytest.mark.parametrize(("data", "message"), [
    ("{}".encode("utf-16"), r"not UTF-8 text: byte 0 is invalid"),
    (b"\xef\xbb\xbf{}", r"Unexpected UTF-8 BOM"),
    (b'{"format": 2, "step": 1' + b"9" * 5000 + b"}", r"Exceeds the limit \(4300 digits\)"),
])
def test_slope_json_of_another_encoding_or_a_huge_number_is_one_line(run, data, message):
    ckpt = run / STEP
    (ckpt / "slope.json").write_bytes(data)
    reseal(ckpt)
    _one_line(checkpoint.load_checkpoint, run, rf"slope\.json: cannot read the checkpoint info \(.*{message}")


# ---- a trainer state that passes the manifest but is malformed -------------------------------------------------


def _edit_state(ckpt: Path, change) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state = change(state)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    reseal(ckpt)


def _set(key, value):
    def change(state):
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
        return state
    return change


M = r"malformed trainer state: "
STATES = {  # (change, what the line says after "trainer_state.json: ")
    # before: each of these reached the trainer, which met it with a KeyError, TypeError or AttributeError
    "a list": (lambda s: [], r"malformed trainer state \(expected a JSON object, got list\)"),
    "no step": (_set("step", KeyError), M + r"step must be a count of steps \(an integer >= 0\), got None"),
    "step a string": (_set("step", "4"), M + r"step must be a count of steps \(an integer >= 0\), got '4'"),
    "no sampler": (_set("sampler", KeyError), M + r"sampler must be an object with a generator state and a count"),
    "no optimizer": (_set("optimizer", KeyError), M + r"optimizer must be an optimizer state_dict"),
    "param_groups a string": (lambda s: {**s, "optimizer": {**s["optimizer"], "param_groups": "x"}},
                              M + r"optimizer must be an optimizer state_dict"),
    "train_seconds NaN": (_set("train_seconds", float("nan")), r"cannot read the trainer state \(NaN is not a JSON number\)"),
    "train_seconds negative": (_set("train_seconds", -1.0), M + r"train_seconds must be a finite number >= 0, got -1.0"),
    "scaler half there": (_set("scaler", {"scale": 1.0}), M + r"scaler must be the loss scaler's state"),
    "rng not an object": (_set("rng", 3), M + r"rng must be an object with the torch, python and numpy generator states"),
    "python rng of another size": (lambda s: {**s, "rng": {**s["rng"], "python": [3, [1, 2], None]}},
                                   M + r"rng\.python is not a generator state \(ValueError: state vector is the wrong size\)"),
    "global_batch 0": (_set("global_batch", 0), M + r"global_batch must be an integer > 0, got 0"),
    "method a list": (_set("method", []), M + r"method must be an object, got \[\]"),
    "init_from ranks not counts": (_set("init_from", {"adapter_ranks": {"x": "4"}, "adapter_scale": None}),
                                   M + r"init_from must be null or an object with adapter_ranks"),
    "a tensor marker of a list": (_set("tokens_seen", {"__tensor__": []}), r"malformed trainer state \(TypeError"),
}


@pytest.mark.parametrize("case", list(STATES))
def test_a_malformed_trainer_state_is_one_line_for_resume_and_check(run, capsys, case):
    change, message = STATES[case]
    ckpt = run / STEP
    _edit_state(ckpt, change)
    line = rf"{ckpt / 'trainer_state.json'}: {message}"
    _one_line(checkpoint.load_for_resume, run, line)
    _check_fails(run, line, capsys)
    checkpoint.load_checkpoint(run)  # loading a model for inference does not need the trainer state


# ---- a Hugging Face folder of pickled weights ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_a_pickle_only_huggingface_folder_is_refused_by_name(tmp_path, model, name):
    folder = tmp_path / "hf"
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("slope", None)
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "unpickled"
    (folder / name).write_bytes(b"not read: " + str(marker).encode())
    _one_line(lambda p: slope.load(p, device="cpu"), folder,
              re.escape(f"{folder} holds only {name} (pickle); slope reads safetensors only: convert it with "
                        "transformers' save_pretrained(safe_serialization=True)"))
    assert not marker.exists()
