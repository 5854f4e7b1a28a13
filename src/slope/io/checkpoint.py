"""Training checkpoints: the one writer (`save_checkpoint`) and the one reader (`load_checkpoint`).

RUN_DIR/checkpoints/step_XXXXXXXX/ holds (file names in slope.io.format)
    model.safetensors   the full model state_dict (SlopeLinear kept values, masks and step counters)
    config.json         the Hugging Face model config
    slope.json          {"format", "method", "slope_config", "adapters", "adapter_rank", "step"}
    tokenizer/          the tokenizer (save_pretrained)
    trainer_state.pt    optimizer, sampler, RNG states and counters (resume only)
    config.toml         the resolved run config
Each is written as checkpoints/.tmp-step_XXXXXXXX and renamed into place, then `checkpoints/latest`
(a one-line text file naming the newest complete checkpoint) is replaced atomically.

The model is rebuilt from these files alone, without the training code: `slope_config` null means
a dense model; otherwise the model is sparsified with that SlopeConfig, and each layer gets
adapters of the rank its `mask_state` records. `method` only names how the run trained: a method
this version does not know still loads when its files have this shape, and strict loading of the
weights refuses any that do not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slope.config import SlopeConfig
from slope.convert import slope_layers, sparsify
from slope.io.format import (
    CHECKPOINT_FORMAT,
    CHECKPOINTS_DIR,
    HF_CONFIG_FILE,
    INFO_FILE,
    LATEST_FILE,
    RUN_CONFIG_FILE,
    TOKENIZER_DIR,
    TRAINER_STATE_FILE,
    WEIGHTS_FILE,
    FormatError,
    one_line,
)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- writing ----------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path, step: int, model, tokenizer, method_info: dict, run_config_toml: str,
    trainer_state: dict, keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, delete all but the newest `keep_last`."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE))
    model.config.save_pretrained(str(tmp))
    info = {"format": CHECKPOINT_FORMAT, **method_info, "step": step}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
    (tmp / RUN_CONFIG_FILE).write_text(run_config_toml)
    if final.exists():  # the same step written again (e.g. after a resume): swap, then drop the old one
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _write_latest(root, final.name)
    for stale in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST_FILE)


def load_trainer_state(checkpoint_dir: Path) -> dict:
    # Our own file: it holds RNG states and the optimizer state dict, so it is not weights-only.
    return torch.load(Path(checkpoint_dir) / TRAINER_STATE_FILE, weights_only=False)


# ---- finding a checkpoint -----------------------------------------------------------------------


def is_checkpoint_or_run(path: str | Path) -> bool:
    """Whether `path` looks like a checkpoint directory or a run directory (`resolve_checkpoint` decides)."""
    path = Path(path)
    return (path / INFO_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / INFO_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names; if that file is missing or stale, the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / INFO_FILE).is_file():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given itself or a run directory (then its `latest_checkpoint`).

    FileNotFoundError when `path` does not exist or holds no complete checkpoint.
    """
    path = Path(path)
    if (path / INFO_FILE).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint directory (no {INFO_FILE}) nor a run directory with a complete "
            f"checkpoint (none under {CHECKPOINTS_DIR}/)"
        )
    return found


# ---- reading ----------------------------------------------------------------------------------


def read_info(checkpoint_dir: str | Path) -> dict:
    """slope.json of a checkpoint directory, checked: FormatError if unreadable or of a newer format."""
    file = Path(checkpoint_dir) / INFO_FILE
    try:
        info = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FormatError(f"{file}: cannot read the checkpoint info ({err})") from err
    if not isinstance(info, dict):
        raise FormatError(f"{file}: expected a JSON object, got {type(info).__name__}")
    version = info.get("format")
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{file}: invalid format {version!r} (expected an integer from 1 to {CHECKPOINT_FORMAT})")
    if version > CHECKPOINT_FORMAT:
        raise FormatError(
            f"{file} has format {version}; this version of slope reads checkpoint formats up to "
            f"{CHECKPOINT_FORMAT}: upgrade slope"
        )
    if not isinstance(info.get("slope_config"), dict | None):
        raise FormatError(f"{file}: slope_config must be an object or null, got {info['slope_config']!r}")
    return info


def load_checkpoint(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, slope.json contents) of a checkpoint or of a run's latest one; CPU, eval mode.

    FileNotFoundError when there is no checkpoint at `path`; FormatError when one of its files is
    missing, damaged, of a newer format, or does not fit the others.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve_checkpoint(path)
    info = read_info(ckpt)
    for part in (HF_CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR):
        if not (ckpt / part).exists():
            raise FormatError(
                f"{ckpt / part} is missing: a checkpoint holds {HF_CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_DIR}/"
            )
    try:
        config = AutoConfig.from_pretrained(ckpt)
        tokenizer = AutoTokenizer.from_pretrained(ckpt / TOKENIZER_DIR)
    except (OSError, ValueError) as err:
        raise FormatError(f"{ckpt}: cannot read {HF_CONFIG_FILE} or {TOKENIZER_DIR}/ ({one_line(err)})") from err
    model = AutoModelForCausalLM.from_config(config)
    if info.get("slope_config") is not None:
        try:
            sparsify(model, SlopeConfig(**info["slope_config"]))
        except (TypeError, ValueError) as err:
            raise FormatError(f"{ckpt / INFO_FILE}: slope_config does not apply to this model ({one_line(err)})") from err
    weights = ckpt / WEIGHTS_FILE
    # strict: every tensor present with its shape, or a clear error before the model is returned
    try:
        if info.get("adapters"):
            _add_adapters_as_saved(model, weights)
        safetensors.torch.load_model(model, weights, strict=True)
    except (RuntimeError, OSError, ValueError, IndexError, SafetensorError) as err:
        raise FormatError(
            f"{weights} does not fit the checkpoint's {INFO_FILE} and {HF_CONFIG_FILE}: {one_line(err)}"
        ) from err
    return model.eval(), tokenizer, info


def _add_adapters_as_saved(model: nn.Module, weights: Path) -> None:
    # Each layer's rank is in its mask_state [mask_steps, column_mask_step, rank]; add_adapter derives
    # the scale from the layer config and rank exactly as it did when training added the adapters.
    with safe_open(weights, framework="pt") as f:
        for name, layer in slope_layers(model):
            rank = int(f.get_tensor(f"{name}.mask_state")[2])
            if rank:
                layer.add_adapter(rank)

