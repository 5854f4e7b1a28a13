"""The on-disk format rules, declared once: versions, file names, checksums, dtype names, `FormatError`.

Two formats share these names (full description in docs/export.md):

- a training checkpoint (`slope.io.checkpoint`): RUN_DIR/checkpoints/step_XXXXXXXX/ with
  model.safetensors, config.json, slope.json, tokenizer/, trainer_state.pt and config.toml, and
  RUN_DIR/checkpoints/latest naming the newest complete one;
- a compressed export (`slope.io.export` writes it, `slope.io.load` reads it): model.safetensors,
  tokenizer/ and slope_model.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


class FormatError(ValueError):
    """A checkpoint or export that cannot be loaded: newer version, corrupted, or inconsistent."""


# The newest slope.json "format" a checkpoint reader understands; the writer stamps it.
CHECKPOINT_FORMAT = 1
# slope_model.json "format" and the newest "format_version" of the compressed export.
EXPORT_FORMAT_NAME = "slope-compressed"
EXPORT_FORMAT_VERSION = 1

WEIGHTS_FILE = "model.safetensors"  # checkpoint and export
TOKENIZER_DIR = "tokenizer"  # checkpoint and export: PreTrainedTokenizer.save_pretrained output
INFO_FILE = "slope.json"  # checkpoint: format, method, slope_config, adapters, step
TRAINER_STATE_FILE = "trainer_state.pt"  # checkpoint: optimizer, sampler and RNG states (resume only)
RUN_CONFIG_FILE = "config.toml"  # checkpoint: the resolved run config
HF_CONFIG_FILE = "config.json"  # checkpoint and Hugging Face directories: the model config (save_pretrained)
CHECKPOINTS_DIR = "checkpoints"  # run directory: holds the step_XXXXXXXX checkpoints
LATEST_FILE = "latest"  # in CHECKPOINTS_DIR: one line naming the newest complete checkpoint
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


def one_line(err: Exception) -> str:
    """`err` for a FormatError message: transformers and torch explain over several lines, the CLI prints one."""
    return f"{type(err).__name__}: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
