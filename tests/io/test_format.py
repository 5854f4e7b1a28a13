"""The format rules (slope.io.format): declared once, dtype names, checksums, one-line errors; the bytes the
writers of the formats that stay (compressed export version 2, checkpoint format 2) write, pinned; and the
one-line refusal of slope 0.1's version 1."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import slope
from slope.io import format as fmt

PACKAGE = Path(fmt.__file__).parents[1]


def test_format_error_is_the_public_one_and_a_value_error():
    assert slope.FormatError is fmt.FormatError
    assert issubclass(fmt.FormatError, ValueError)


def _string_constants(tree: ast.Module) -> set[str]:
    """Every string literal of a module except docstrings and dict keys (metadata field names, such
    as the export's "tokenizer" field, may equal a file name)."""
    skipped = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    skipped |= {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped}


def test_file_names_and_versions_are_declared_only_in_format():
    """No module of the package spells out a file name or version of slope.io.format: each uses the constant."""
    rules = {fmt.WEIGHTS_FILE, fmt.EXPORT_WEIGHTS_FILE, fmt.INFO_FILE, fmt.TRAINER_STATE_FILE, fmt.RUN_CONFIG_FILE,
             fmt.HF_CONFIG_FILE, fmt.CHECKPOINTS_DIR, fmt.LATEST_FILE, fmt.META_FILE, fmt.EXPORT_FORMAT_NAME,
             fmt.SERVE_FORMAT, fmt.TRAINER_TENSORS_FILE, fmt.MANIFEST_FILE}
    # "tokenizer" is checked inside slope.io only: elsewhere it is also a keyword, a config section and the
    # folder of `slope prepare`'s output (a layout train/prepare.py owns), not a file of these formats
    io_rules = rules | {fmt.TOKENIZER_DIR}
    found = {}
    for module in sorted(PACKAGE.rglob("*.py")):
        name = module.relative_to(PACKAGE).as_posix()
        if name == "io/format.py":
            continue
        tree = ast.parse(module.read_text())
        spelled = _string_constants(tree) & (io_rules if name.startswith("io/") else rules)
        assigned = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        versions = assigned & {"FORMAT", "FORMAT_VERSION", "CHECKPOINT_FORMAT", "EXPORT_FORMAT_VERSION", "DTYPES"}
        if spelled or versions:
            found[name] = sorted(spelled | versions)
    assert not found, f"spelled out instead of imported from slope.io.format: {found}"


@pytest.mark.parametrize("name", list(fmt.DTYPES))
def test_dtype_names_round_trip(name):
    assert fmt.dtype_name(fmt.DTYPES[name]) == name


def test_dtype_name_refuses_what_the_format_cannot_record():
    with pytest.raises(ValueError, match="cannot be stored"):
        fmt.dtype_name(torch.int8)


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert fmt.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_one_line_keeps_every_line_of_a_multi_line_error():
    err = RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): a.\n\n\tUnexpected key(s): b.")
    assert fmt.one_line(err) == "RuntimeError: Error(s) in loading state_dict: Missing key(s): a. Unexpected key(s): b."


# ---- golden bytes: the formats that stay, as their writers write them ---------------------------------------
# A tiny LLaMA whose every stored number is set by formula and is a multiple of 1/8 (exact in any float
# dtype), with four distinct magnitudes in every group of 4, so that no 2:4 mask depends on tie-breaking:
# the same bytes on every machine. Pinned: every file that only slope and safetensors write, and the JSON
# documents field by field, except what transformers and tokenizers write (model_config, the config.json
# files, the tokenizer files: their versions are inside). A safetensors file is pinned by its size, its
# header (names, dtypes, shapes, offsets, metadata) as data and the sha256 of its tensor bytes: safetensors
# writes the metadata's keys in a random order (a Rust HashMap), so the export's weights file has another
# sha256 in every process. A failure means that files written after the change differ from files written
# before it. If that is intended, it is a format change: bump the version in slope/io/format.py, describe
# it in docs/export.md, then update these constants.

GOLDEN_SLOPE_CONFIG = {
    "n": 2, "m": 4, "double_prune": True, "backward_mask_interval": 1, "adapter_rank": None,
    "adapter_rank_ratio": None, "adapter_start": 0.5, "adapter_init": "normal", "adapter_scale": 0.5,
    "skip": ["lm_head"], "keep_first_linear_dense": True, "on_indivisible": "skip", "backend": "reference",
}
SPARSE = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
          "model.layers.0.mlp.down_proj"]
SHAPES = {SPARSE[0]: [16, 16], SPARSE[1]: [32, 16], SPARSE[2]: [32, 16], SPARSE[3]: [16, 32]}

GOLDEN_EXPORT_WEIGHTS = {"bytes": 13888, "header": "0a4bb00497a170ec3366125b6cdcaf1068587e19f0415ce315aaee94846b7330",
                         "data": "fb63bd4051b246b11c31afe9f0ac1ff69f5c7cc43df019842ffc9656edb86f8f"}
GOLDEN_EXPORT_META = {  # slope_model.json without model_config and the entry of config.json under files
    "format": "slope-compressed", "format_version": 2, "n": 2, "m": 4, "position_code": "combinations",
    "position_bits": 3, "dtype": "float32", "slope_config": {**GOLDEN_SLOPE_CONFIG, "backend": "auto"},
    "layers": {name: {"shape": SHAPES[name], "source": "linear", "bias": False, "adapter_rank": 2, "adapter_scale": 0.5}
               for name in SPARSE},
    "skipped": ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                "model.layers.0.self_attn.v_proj"],  # the reasons are prose: only the names are pinned
    "tied": {}, "tokenizer": None, "files": {"slope_model.safetensors": {"bytes": 13888}},  # its sha256: see above
}
# metadata_sha256 (last, since it reads the file with its own value as 64 zeros) is not pinned: the bytes it
# covers include model_config, which transformers writes; test_golden_compressed_export checks it verifies.
GOLDEN_META_KEYS = ["format", "format_version", "n", "m", "position_code", "position_bits", "dtype", "slope_config",
                    "layers", "skipped", "tied", "model_config", "tokenizer", "files", "metadata_sha256"]

# checkpoint format 2, step 3: the files that do not depend on transformers, as manifest.json lists them
GOLDEN_CHECKPOINT_FILES = {
    "config.toml": {"bytes": 21, "sha256": "852087f7ebdaf2df5dbf865b3d81c6db58cc9b12a604da8d4c6ead08aec69bac"},
    "slope.json": {"bytes": 434, "sha256": "3e65bcae2ef596a4b93d467770091bf404fdb8f5ed4a08d5abc724639aee5fa2"},
    "trainer_state.json": {"bytes": 265, "sha256": "e63035f903f3a032806730705614f3215fe4dc8cfd0d06739d1d6c817e346352"},
}
GOLDEN_CHECKPOINT_TENSORS = {
    "model.safetensors": {"bytes": 15416, "header": "c00e3251831cffeae8ec87cce63e6e0805b69abeaef25a5363c8fc5b88a76da9",
                          "data": "4358e099b086be7436a8d389d3f9c91fbbb60d6e426aa2defb021e16261d1398"},
    "trainer_state.safetensors": {
        "bytes": 140, "header": "30d0993f36f13878ea3999c28fad62fe3c34bfeb11d7e03d58c54de4b0e9a144",
        "data": "854c0d2e10debb7284834b3623843580037eb15b5b97c13cfee2201b79915595"},
}
GOLDEN_SLOPE_JSON = {"format": 2, "method": "slope", "slope_config": GOLDEN_SLOPE_CONFIG, "adapters": True,
                     "adapter_rank": 2, "step": 3}
# the trainer state's markers: a tensor, a tuple, a dict with int keys
GOLDEN_TRAINER_STATE_JSON = (
    '{"step": 3, "tokens_seen": 96, "optimizer": {"state": {"__items__": [[0, {"step": {"__tensor__": "0"}, '
    '"exp_avg": {"__tensor__": "1"}}]]}, "param_groups": [{"lr": 0.5, "betas": {"__tuple__": [0.875, 0.9375]}, '
    '"params": [0]}]}, "rng": {"python": [3, [1, 2], null]}}\n'
)


def _golden_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            i = torch.arange(p.shape[0]).view(-1, *[1] * (p.dim() - 1))
            j = torch.arange(p.shape[-1]) if p.dim() > 1 else torch.zeros((), dtype=torch.long)
            # within a group of 4 along `in`, (3i + 3j) mod 4 takes each value once: distinct magnitudes
            magnitude = ((3 * i + 3 * j) % 4 + 1 + 4 * ((i + j // 4) % 3)).float()
            p.copy_(((1 - 2 * ((i + j) % 2)) * magnitude / 8).expand_as(p))
    slope.sparsify(model, slope.SlopeConfig(**{**GOLDEN_SLOPE_CONFIG, "skip": ("lm_head",)}))
    with torch.no_grad():
        for k, (_, layer) in enumerate(slope.slope_layers(model)):
            layer.add_adapter(2)
            for t in (layer.adapter_a, layer.adapter_b):
                t.copy_((torch.arange(t.numel()).view_as(t) % 5 - 2 + k) / 4)
    return model.eval()


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """The golden model, its compressed export and a one-checkpoint run, written by today's writers."""
    from _export_fixtures import make_tokenizer

    from slope.io import checkpoint

    root = tmp_path_factory.mktemp("golden")
    model = _golden_model()
    export = slope.save_compressed(model, root / "export")
    info = {"method": "slope", "slope_config": slope.slope_layers(model)[0][1].config.to_dict(), "adapters": True,
            "adapter_rank": 2}
    state = {"step": 3, "tokens_seen": 96,
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(4.0) / 8}},
                           "param_groups": [{"lr": 0.5, "betas": (0.875, 0.9375), "params": [0]}]},
             "rng": {"python": [3, [1, 2], None]}}
    ckpt = checkpoint.save_checkpoint(root / "run", 3, model, make_tokenizer(), info, "[train]\nseq_len = 16\n",
                                      state, keep_last=1)
    return {"model": model, "export": export, "run": root / "run", "checkpoint": ckpt}


def _header(file: Path) -> dict:
    """A safetensors file's header (tensor names, dtypes, shapes, offsets, metadata)."""
    data = file.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def _tensors_digest(file: Path) -> dict:
    """Size, header (as data: its key order is not pinned) and tensor bytes of a safetensors file."""
    data = file.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:end]), sort_keys=True).encode()
    return {"bytes": len(data), "header": hashlib.sha256(header).hexdigest(), "data": hashlib.sha256(data[end:]).hexdigest()}


def test_golden_compressed_export(golden):
    export = golden["export"]
    weights = export / fmt.EXPORT_WEIGHTS_FILE
    assert _tensors_digest(weights) == GOLDEN_EXPORT_WEIGHTS, _header(weights)
    raw = (export / fmt.META_FILE).read_bytes()
    meta = json.loads(raw)
    assert list(meta) == GOLDEN_META_KEYS
    # its own checksum: the SHA-256 of the file as it reads with that value replaced by 64 zeros
    digest = meta.pop(fmt.META_CHECKSUM_KEY)
    assert hashlib.sha256(raw.replace(digest.encode(), b"0" * 64)).hexdigest() == digest
    assert raw.endswith(f'"metadata_sha256": "{digest}"\n}}\n'.encode())
    assert set(meta["files"]) == {fmt.EXPORT_WEIGHTS_FILE, fmt.HF_CONFIG_FILE, "README.md"}
    meta["files"].pop(fmt.HF_CONFIG_FILE)
    assert meta["files"].pop("README.md")["sha256"] == fmt.sha256_file(export / "README.md")  # the model card
    assert meta["files"][fmt.EXPORT_WEIGHTS_FILE].pop("sha256") == fmt.sha256_file(weights)
    meta.pop("model_config")
    meta["skipped"] = list(meta["skipped"])
    assert meta == GOLDEN_EXPORT_META
    top = json.loads((export / fmt.HF_CONFIG_FILE).read_text())
    assert top["slope"] == {"format": "slope-compressed", "format_version": 2, "metadata": "slope_model.json"}


def test_golden_checkpoint(golden):
    ckpt, run = golden["checkpoint"], golden["run"]
    assert ckpt == run / "checkpoints" / "step_00000003"
    assert (run / "checkpoints" / "latest").read_bytes() == b"step_00000003\n"
    assert json.loads((ckpt / "slope.json").read_text()) == GOLDEN_SLOPE_JSON
    assert (ckpt / "trainer_state.json").read_text() == GOLDEN_TRAINER_STATE_JSON
    assert (ckpt / "config.toml").read_text() == "[train]\nseq_len = 16\n"
    for name, digest in GOLDEN_CHECKPOINT_TENSORS.items():
        assert _tensors_digest(ckpt / name) == digest, (name, _header(ckpt / name))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert list(manifest) == ["format", "files"] and manifest["format"] == 2
    assert set(manifest["files"]) == {*GOLDEN_CHECKPOINT_FILES, *GOLDEN_CHECKPOINT_TENSORS, "config.json",
                                      "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    assert {name: manifest["files"][name] for name in GOLDEN_CHECKPOINT_FILES} == GOLDEN_CHECKPOINT_FILES
    for name in GOLDEN_CHECKPOINT_FILES:  # the manifest tells the truth about the files
        assert manifest["files"][name] == {"bytes": (ckpt / name).stat().st_size, "sha256": fmt.sha256_file(ckpt / name)}


def test_golden_files_load_back(golden):
    """The pinned bytes are what the readers read: both give back the model, every tensor exactly."""
    from slope.io import checkpoint

    want = golden["model"].state_dict()
    for model in (slope.load(golden["export"], device="cpu", backend="reference"),
                  checkpoint.load_checkpoint(golden["run"])[0]):
        got = model.state_dict()
        # the export stores no column mask (a training cache): only the checkpoint has it
        assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)
        assert set(want) - set(got) <= {f"{name}.col_bits" for name in SPARSE}


# ---- version 1 (slope 0.1): refused in one line --------------------------------------------------------------


def test_a_format1_checkpoint_is_refused_in_one_line(golden, tmp_path, capsys):
    from _export_fixtures import format1_run

    from slope.cli import main
    from slope.io import checkpoint

    marker = tmp_path / "pwned"
    run = format1_run(tmp_path / "run", golden["run"], marker)
    ckpt = run / "checkpoints" / "step_00000003"
    expected = (f"{ckpt / 'slope.json'} has checkpoint format 1, which this version of slope does not read (it reads "
                "format 2 only; format 1 was written by slope 0.1)")
    for read in (checkpoint.load_checkpoint, checkpoint.load_for_resume, lambda p: slope.load(p, device="cpu")):
        with pytest.raises(fmt.UnsupportedFormatError) as err:
            read(run)
        assert str(err.value) == expected
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err == f"slope export: error: {expected}\n"
    assert not marker.exists()  # the pickle was never opened


def test_a_version1_export_is_refused_in_one_line(golden, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(golden["export"], export)
    meta = json.loads((export / "slope_model.json").read_text())
    meta.pop(fmt.META_CHECKSUM_KEY)  # version 1 had no checksum of its own
    (export / "slope_model.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(fmt.UnsupportedFormatError) as err:
        slope.load(export, device="cpu")
    assert str(err.value) == (f"{export / 'slope_model.json'} has format version 1, which this version of slope does "
                              "not read (it reads version 2 only; version 1 was written by slope 0.1)")


def test_an_edited_version_fails_the_checksum_and_never_skips_it(golden, tmp_path):
    """A format version read from a file the checksums cover: an edit of it is a checksum error, for the
    export (slope_model.json's own checksum) and the checkpoint (the manifest covers slope.json)."""
    from slope.io import checkpoint

    export = tmp_path / "export"
    shutil.copytree(golden["export"], export)
    meta_file = export / "slope_model.json"
    meta_file.write_bytes(meta_file.read_bytes().replace(b'"format_version": 2', b'"format_version": 1'))
    with pytest.raises(fmt.FormatError, match="fails its own SHA-256 check") as err:
        slope.load(export, device="cpu")
    assert not isinstance(err.value, fmt.UnsupportedFormatError)
    run = tmp_path / "run"
    shutil.copytree(golden["run"], run)
    info = run / "checkpoints" / "step_00000003" / "slope.json"
    for version in (b"1", b"true"):
        info.write_bytes(info.read_bytes().replace(b'"format": 2', b'"format": ' + version))
        for read in (checkpoint.load_checkpoint, checkpoint.load_for_resume, lambda p: slope.load(p, device="cpu")):
            with pytest.raises(fmt.FormatError, match=r"slope\.json (fails its SHA-256 check|has \d+ bytes, expected)") as err:
                read(run)
            assert not isinstance(err.value, fmt.UnsupportedFormatError) and "\n" not in str(err.value)
        info.write_bytes(info.read_bytes().replace(b'"format": ' + version, b'"format": 2'))


def test_a_version2_export_without_its_own_checksum_is_refused(golden, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(golden["export"], export)
    meta = json.loads((export / "slope_model.json").read_text())
    meta.pop(fmt.META_CHECKSUM_KEY)  # as slope 0.2 before the checksum wrote it, or an edit that removed it
    meta["layers"][SPARSE[0]]["adapter_scale"] = 100.0
    (export / "slope_model.json").write_text(json.dumps(meta))
    with pytest.raises(fmt.FormatError, match="has no metadata_sha256") as err:
        slope.load(export, device="cpu")
    assert "\n" not in str(err.value)
