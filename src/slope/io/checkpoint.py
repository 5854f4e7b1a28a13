"""Checkpoints: atomic directories, keep-last-K, and `load_model` for everything downstream.

RUN_DIR/checkpoints/step_XXXXXXXX/ holds
    model.safetensors   the full model state_dict (SlopeLinear kept values, masks and step counters)
    config.json         the Hugging Face model config
    slope.json          {"format", "method", "slope_config", "adapters", "adapter_rank", "step"}
    tokenizer/          the tokenizer (save_pretrained)
    trainer_state.pt    optimizer, sampler, RNG states and counters (resume only)
    config.toml         the resolved run config
Each is written as checkpoints/.tmp-step_XXXXXXXX and renamed into place, then `checkpoints/latest`
(a one-line text file naming the newest complete checkpoint) is replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch

FORMAT = 1
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A path that is not a checkpoint or run directory, or a checkpoint that cannot be read."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    run_dir: Path, step: int, model, tokenizer, method_info: dict, run_config_toml: str,
    trainer_state: dict, keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, delete all but the newest `keep_last`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    model.config.save_pretrained(str(tmp))
    info = {"format": FORMAT, **method_info, "step": step}
    (tmp / "slope.json").write_text(json.dumps(info, indent=1) + "\n")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "config.toml").write_text(run_config_toml)
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
    tmp = root / f".{LATEST}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / LATEST)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "slope.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names (or, if that file is missing or stale, the newest complete one)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "slope.json").is_file():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given itself or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / "slope.json").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path} is neither a checkpoint (no slope.json) nor a run directory with checkpoints")
    return found


def read_info(checkpoint_dir: Path) -> dict:
    info = json.loads((Path(checkpoint_dir) / "slope.json").read_text())
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{checkpoint_dir}: unsupported checkpoint format {info.get('format')!r} (expected {FORMAT})")
    return info


def load_model(checkpoint_dir: str | Path):
    """(model, tokenizer) of a checkpoint or of a run directory's latest checkpoint, on CPU, in eval mode.

    The model is rebuilt from config.json, the saved method is re-applied (sparsify with the saved
    SlopeConfig, adapters if it had them), then model.safetensors is loaded strictly.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slope.train.methods import METHODS

    ckpt = resolve_checkpoint(checkpoint_dir)
    info = read_info(ckpt)
    if info["method"] not in METHODS:
        raise CheckpointError(f"{ckpt}: unknown method {info['method']!r} (known: {', '.join(METHODS)})")
    config = AutoConfig.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_config(config)
    METHODS[info["method"]].rebuild(model, info)
    safetensors.torch.load_model(model, str(ckpt / "model.safetensors"), strict=True)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    model.eval()
    return model, tokenizer


def load_trainer_state(checkpoint_dir: Path) -> dict:
    # Our own file: it holds RNG states and the optimizer state dict, so it is not weights-only.
    return torch.load(Path(checkpoint_dir) / "trainer_state.pt", weights_only=False)
