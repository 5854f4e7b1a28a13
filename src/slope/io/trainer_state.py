"""The trainer state of a checkpoint as trainer_state.json + trainer_state.safetensors, with no pickle.

The trainer state (counters, the sampler, optimizer.state_dict(), RNG states) is plain data around
tensors. Its tensors go to trainer_state.safetensors under the keys "0", "1", ...; the rest goes to
trainer_state.json, where each tensor is a {"__tensor__": key}. JSON has no tensors, tuples or
non-string keys, so these markers carry them, and a state dict (optimizer.state_dict() has int keys and
tuple betas) comes back exactly as it was saved. Reading it runs no code from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from slope.io.format import TRAINER_STATE_FILE, TRAINER_TENSORS_FILE, FormatError, one_line


def write_trainer_state(folder: Path, state: dict) -> None:
    """`state` (tensors, plain data, tuples, int keys) as trainer_state.json + trainer_state.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(state, tensors)
    safetensors.torch.save_file(tensors, str(Path(folder) / TRAINER_TENSORS_FILE))
    (Path(folder) / TRAINER_STATE_FILE).write_text(json.dumps(plain) + "\n")


def load_trainer_state(checkpoint_dir: Path) -> dict:
    """The trainer state of a checkpoint (resume only), read without unpickling anything.

    trainer_state.json and trainer_state.safetensors; FormatError (one line) when they are missing or damaged.
    """
    folder = Path(checkpoint_dir)
    plain_file = folder / TRAINER_STATE_FILE
    if not plain_file.is_file():
        raise FormatError(f"{folder} has no trainer state ({TRAINER_STATE_FILE}): it cannot be resumed")
    try:
        plain = json.loads(plain_file.read_text())
        tensors = safetensors.torch.load_file(folder / TRAINER_TENSORS_FILE)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as err:
        raise FormatError(f"{folder}: cannot read the trainer state ({one_line(err)})") from err
    try:
        return _decode(plain, tensors, plain_file)
    except FormatError:
        raise
    except (TypeError, ValueError) as err:  # a marker with the wrong shape: not what the writer wrote
        raise FormatError(f"{plain_file}: malformed trainer state ({one_line(err)})") from err


def _encode(value, tensors: dict[str, torch.Tensor]):
    """`value` as JSON-ready data; each tensor is added to `tensors` and replaced by its marker."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"the trainer state holds a {type(value).__name__}, which a checkpoint cannot store")


def _decode(value, tensors: dict[str, torch.Tensor], file: Path):
    """What `_encode` was given, from its output and the tensors read back; `file` names the JSON in errors."""
    if isinstance(value, list):
        return [_decode(v, tensors, file) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        if value["__tensor__"] not in tensors:
            raise FormatError(f"{file}: tensor {value['__tensor__']!r} is not in {TRAINER_TENSORS_FILE}")
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(_decode(v, tensors, file) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors, file): _decode(v, tensors, file) for k, v in value["__items__"]}
    return {k: _decode(v, tensors, file) for k, v in value.items()}
