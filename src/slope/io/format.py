"""The on-disk format rules, declared once: versions, file names, checksums, dtype names, `FormatError`.

Two formats share these names (full description in docs/export.md):

- a training checkpoint (`slope.io.checkpoint`), format 2: RUN_DIR/checkpoints/step_XXXXXXXX/ with
  model.safetensors, config.json, slope.json, tokenizer/, trainer_state.json,
  trainer_state.safetensors, config.toml, manifest.json (and dcp/ in an FSDP run), and
  RUN_DIR/checkpoints/latest naming the newest complete one;
- a compressed export (`slope.io.export` writes it, `slope.io.load` reads it), version 2:
  slope_model.safetensors, tokenizer/, config.json, the tokenizer files at the top and slope_model.json.

Each reader reads its format's current version only. Version 1 of both (slope 0.1) is refused in one line
(UnsupportedFormatError), naming the version found and the one this slope reads.

Two Hugging Face folders carry a `slope` entry in config.json that `slope.io.load` recognises: the
`save_pretrained` folder of a sparsified model (format "slope-state-dict", slope.convert.HF_CONFIG_FORMAT)
and the serving export (SERVE_FORMAT, slope.io.serve).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


class FormatError(ValueError):
    """A checkpoint or export that cannot be loaded: another version, corrupted, or inconsistent."""


class UnsupportedFormatError(FormatError):
    """A checkpoint or export of an older format version than this slope reads (slope 0.1's version 1)."""


# The slope.json "format" the checkpoint writer stamps and the reader reads. Format 2 (no pickle: the
# trainer state is JSON plus safetensors; a manifest of checksums) replaced slope 0.1's format 1.
CHECKPOINT_FORMAT = 2
# slope_model.json "format" and the "format_version" of the compressed export. Version 2 names its
# weights file slope_model.safetensors instead of version 1's model.safetensors: since the export has
# a config.json that transformers recognises, a file under transformers' own name was loaded by
# AutoModelForCausalLM.from_pretrained as a model with every sparse layer missing (randomly initialised,
# with only a warning). Under another name transformers finds no weights and refuses the folder.
EXPORT_FORMAT_NAME = "slope-compressed"
EXPORT_FORMAT_VERSION = 2
EXPORT_WEIGHTS_FILE = "slope_model.safetensors"  # compressed export: all tensors

# config.json's `slope.format` in the folder of `slope export --serve` (slope.io.serve)
SERVE_FORMAT = "slope-serve"

WEIGHTS_FILE = "model.safetensors"  # checkpoint and save_pretrained folders: the state_dict
TOKENIZER_DIR = "tokenizer"  # checkpoint and export: PreTrainedTokenizer.save_pretrained output
INFO_FILE = "slope.json"  # checkpoint: format, method, slope_config, adapters, step
TRAINER_STATE_FILE = "trainer_state.json"  # checkpoint: counters and plain data of the trainer state (resume only)
TRAINER_TENSORS_FILE = "trainer_state.safetensors"  # checkpoint: the trainer state's tensors (optimizer, RNG)
MANIFEST_FILE = "manifest.json"  # checkpoint: size and SHA-256 of every other file, written last
RUN_CONFIG_FILE = "config.toml"  # checkpoint and run directory: the resolved run config
HF_CONFIG_FILE = "config.json"  # checkpoint and Hugging Face directories: the model config (save_pretrained)
CHECKPOINTS_DIR = "checkpoints"  # run directory: holds the step_XXXXXXXX checkpoints
LATEST_FILE = "latest"  # in CHECKPOINTS_DIR: one line naming the newest complete checkpoint
SHARDED_DIR = "dcp"  # checkpoint of an FSDP run: the model and optimizer shards (torch.distributed.checkpoint)
META_FILE = "slope_model.json"  # export: the metadata, written last

# The floating dtypes a file may store, by the name the metadata records.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The recorded name of `dtype` (the key of DTYPES); ValueError for a dtype the format does not store."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored: expected one of {', '.join(DTYPES)}")


def one_line(err: BaseException) -> str:
    """`err` as "Type: message" on one line, for any message a user sees (the CLI prints one line per error).

    transformers, torch, lm-eval and W&B explain over several lines; every line is kept, joined, so the
    cause is not lost with the first line. An error without a message is its type's name.
    """
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def confined(base: Path, relative: str, what: str) -> Path:
    """`base / relative`, resolved; FormatError when it lands outside `base` (`..`, an absolute path, a symlink).

    Names read from metadata are data, not trusted paths: nothing outside the folder is read or hashed.
    """
    if not isinstance(relative, str):
        raise FormatError(f"{what}: expected a file name, got {relative!r}")
    root = Path(base).resolve()
    target = (root / relative).resolve()
    if not target.is_relative_to(root) or target == root:
        raise FormatError(f"{what}: {relative!r} points outside {base}; refusing to follow it")
    return target


def file_digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` except the names in `skip`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}


def check_digests(folder: Path, files: dict, listing: Path) -> None:
    """Every file `files` lists (as `file_digests` returns) is inside `folder`, with its size and SHA-256.

    `listing` is the file that holds the list, named in the messages. FormatError, in one line, at the
    first file that is missing, outside the folder, truncated or corrupted.
    """
    if not isinstance(files, dict):
        raise FormatError(f"{listing}: 'files' must be an object, got {type(files).__name__}")
    for name, expected in files.items():
        file = confined(folder, name, str(listing))
        if not file.is_file():
            raise FormatError(f"{file} is missing")
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= set(expected):
            raise FormatError(f"{listing}: the entry of {name!r} needs 'bytes' and 'sha256'")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise FormatError(f"{file} has {size} bytes, expected {expected['bytes']}: the file is truncated or altered")
        if sha256_file(file) != expected["sha256"]:
            raise FormatError(f"{file} fails its SHA-256 check: the file is corrupted")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
