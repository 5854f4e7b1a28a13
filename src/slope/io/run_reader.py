"""Read a training checkpoint written by `slope train` (RUN_DIR/checkpoints/step_XXXXXXXX/).

A checkpoint directory holds model.safetensors (the full state_dict), config.json (Hugging Face
model config), slope.json ({"format", "method", "slope_config", "adapters", "adapter_rank",
"step"}) and tokenizer/. This reader rebuilds the model from those files alone, so export does
not depend on the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model

from slope.config import SlopeConfig
from slope.convert import slope_layers, sparsify
from slope.io.export import FormatError

CHECKPOINT_FORMAT = 1  # the newest slope.json "format" this reader understands


def is_training_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / "checkpoints" / "latest").is_file() or (path / "slope.json").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory: `path` itself, or the newest complete one of a run directory."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        ckpt = Path(name) if Path(name).is_absolute() else path / "checkpoints" / name
        if not (ckpt / "slope.json").is_file():
            raise FileNotFoundError(f"{latest} names {name!r}, but {ckpt / 'slope.json'} does not exist")
        return ckpt
    if (path / "slope.json").is_file():
        return path
    raise FileNotFoundError(
        f"{path} is neither a run directory (no checkpoints/latest) nor a checkpoint directory (no slope.json)"
    )


def read_training_checkpoint(path: str | Path) -> tuple[torch.nn.Module, object | None, dict]:
    """(model, tokenizer or None, slope.json contents) of a run or checkpoint directory, on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / "slope.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{ckpt / 'slope.json'}: cannot read it ({err})") from err
    version = meta.get("format")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
        raise FormatError(
            f"{ckpt / 'slope.json'} has format {version!r}; this version of slope reads checkpoint "
            f"formats up to {CHECKPOINT_FORMAT}: upgrade slope"
        )
    config = AutoConfig.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_config(config)
    weights = ckpt / "model.safetensors"
    if meta.get("method") == "slope":
        try:
            slope_config = SlopeConfig(**meta["slope_config"])
        except (TypeError, ValueError) as err:
            raise FormatError(f"{ckpt / 'slope.json'}: invalid slope_config ({err})") from err
        sparsify(model, slope_config)
    elif meta.get("method") != "dense":
        raise FormatError(f"{ckpt / 'slope.json'}: unknown method {meta.get('method')!r} (expected 'slope' or 'dense')")
    # strict: every tensor present with its shape, or a clear error before the model is returned
    try:
        if meta.get("method") == "slope" and meta.get("adapters"):
            _add_adapters_as_saved(model, weights)
        load_model(model, weights, strict=True)
    except (RuntimeError, OSError, KeyError, SafetensorError) as err:
        raise FormatError(f"{weights} does not fit the checkpoint's config: {err}") from err
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return model, tokenizer, meta


def _add_adapters_as_saved(model: torch.nn.Module, weights: Path) -> None:
    # Each layer's rank is in its mask_state [mask_steps, column_mask_step, rank]; the scale follows
    # from the layer config and rank exactly as when the adapters were added in training.
    with safe_open(weights, framework="pt") as f:
        for name, layer in slope_layers(model):
            rank = int(f.get_tensor(f"{name}.mask_state")[2])
            if rank:
                layer.add_adapter(rank)
