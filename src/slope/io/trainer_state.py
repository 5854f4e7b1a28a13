"""The trainer state of a checkpoint as trainer_state.json + trainer_state.safetensors, with no pickle.

The trainer state (counters, the sampler, optimizer.state_dict(), RNG states) is plain data around
tensors. Its tensors go to trainer_state.safetensors under the keys "0", "1", ...; the rest goes to
trainer_state.json, where each tensor is a {"__tensor__": key}. JSON has no tensors, tuples or
non-string keys, so these markers carry them, and a state dict (optimizer.state_dict() has int keys and
tuple betas) comes back exactly as it was saved. Reading it runs no code from the files.

`check_resumable` checks what a resume reads of it (the fields slope.train.trainer writes), so that a
state that passes the manifest but is malformed is refused in one line, not met by the trainer.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from slope.io.format import (
    INFO_FILE,
    TRAINER_STATE_FILE,
    TRAINER_TENSORS_FILE,
    WEIGHTS_FILE,
    FormatError,
    check_checkpoint_masks,
    one_line,
    read_json,
)


def write_trainer_state(folder: Path, state: dict) -> None:
    """`state` (tensors, plain data, tuples, int keys) as trainer_state.json + trainer_state.safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(state, tensors)
    safetensors.torch.save_file(tensors, str(Path(folder) / TRAINER_TENSORS_FILE))
    (Path(folder) / TRAINER_STATE_FILE).write_text(json.dumps(plain) + "\n")


def load_trainer_state(checkpoint_dir: Path) -> dict:
    """The trainer state of a checkpoint (resume only), read without unpickling anything.

    trainer_state.json and trainer_state.safetensors; FormatError (one line) when they are missing or damaged.
    A JSON object whose `step` is a count; what a resume needs besides is `check_resumable`'s.
    """
    folder = Path(checkpoint_dir)
    plain_file = folder / TRAINER_STATE_FILE
    if not plain_file.is_file():
        raise FormatError(f"{folder} has no trainer state ({TRAINER_STATE_FILE}): it cannot be resumed")
    plain = read_json(plain_file, "the trainer state")
    try:
        tensors = safetensors.torch.load_file(folder / TRAINER_TENSORS_FILE)
    except (OSError, SafetensorError) as err:
        raise FormatError(f"{folder}: cannot read the trainer state ({one_line(err)})") from err
    try:
        state = _decode(plain, tensors, plain_file)
    except FormatError:
        raise
    except (TypeError, ValueError, RecursionError) as err:  # a marker with the wrong shape: not what the writer wrote
        raise FormatError(f"{plain_file}: malformed trainer state ({one_line(err)})") from err
    if not isinstance(state, dict):
        raise FormatError(f"{plain_file}: malformed trainer state (expected a JSON object, got {type(state).__name__})")
    _need(plain_file, "step", _is_count(state.get("step")), "a count of steps (an integer >= 0)", state.get("step"))
    return state


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


# ---- what a resume reads ----------------------------------------------------------------------------


def read_resume_state(checkpoint_dir: Path, info: dict, sharded: bool) -> dict:
    """The trainer state of a verified checkpoint (`info`: its slope.json), after the checks a resume
    makes besides the manifest: it reads, its step is slope.json's, it holds what a resume reads
    (`check_resumable`), and the masks of model.safetensors pass `slope.io.format.mask_findings`."""
    folder = Path(checkpoint_dir)
    state = load_trainer_state(folder)
    if state["step"] != info["step"]:
        raise FormatError(f"{folder / TRAINER_STATE_FILE}: the trainer state is at step {state['step']}, but "
                          f"{INFO_FILE} records step {info['step']}")
    check_resumable(state, folder / TRAINER_STATE_FILE, sharded)
    check_checkpoint_masks(folder / WEIGHTS_FILE, info)
    return state


def _is_int(v) -> bool:
    """An integer a torch or numpy integer holds: JSON's reach far beyond (10**400), which arithmetic with
    floats (tokens per second) cannot convert."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_count(v) -> bool:
    return _is_int(v) and v >= 0


def _is_ints(v) -> bool:
    return isinstance(v, list | tuple) and all(_is_int(x) for x in v)


def _is_bytes(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1


def _need(file: Path, field: str, ok: bool, expected: str, got) -> None:
    if not ok:
        shown = f"a tensor of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)[:80]
        raise FormatError(f"{file}: malformed trainer state: {field} must be {expected}, got {shown}")


def check_resumable(state: dict, file: Path, sharded: bool) -> None:
    """FormatError, in one line naming `file`, unless `state` holds what a resume reads, each of its type.

    Counters (step, tokens_seen, train_seconds), the window sampler, the loss scaler, every random
    generator's state (each set on a scratch generator, as the resume will set the real one), the
    optimizer state unless `sharded` (an FSDP checkpoint keeps it in dcp/), the method's state, the
    global batch, the record of an --init-from source. Fields a resume does not read are left alone.
    """
    _need(file, "tokens_seen", _is_count(state.get("tokens_seen")), "an integer >= 0", state.get("tokens_seen"))
    seconds = state.get("train_seconds")
    _need(file, "train_seconds", (isinstance(seconds, float) or _is_int(seconds)) and math.isfinite(seconds)
          and seconds >= 0, "a finite number >= 0", seconds)
    sampler = state.get("sampler")
    _need(file, "sampler", isinstance(sampler, dict) and _is_count(sampler.get("batches"))
          and _is_bytes(sampler.get("generator")), "an object with a generator state and a count of batches", sampler)
    _need(file, "scaler", _is_scaler(state.get("scaler")), "the loss scaler's state (an object, empty when it is off)",
          state.get("scaler"))
    _need(file, "method", isinstance(state.get("method", {}), dict), "an object", state.get("method"))
    batch = state.get("global_batch")
    _need(file, "global_batch", batch is None or (_is_int(batch) and batch > 0), "an integer > 0", batch)
    source = state.get("init_from")  # a run started from another's weights (slope.train.init_from)
    _need(file, "init_from", source is None or (isinstance(source, dict) and isinstance(source.get("adapter_ranks"), dict)
          and all(_is_int(r) and r > 0 for r in source["adapter_ranks"].values())
          and isinstance(source.get("adapter_scale"), int | float | None) and not isinstance(source.get("adapter_scale"), bool)),
          "null or an object with adapter_ranks ({layer: rank}) and adapter_scale", source)
    if not sharded:
        _need(file, "optimizer", _is_optimizer(state.get("optimizer")),
              "an optimizer state_dict ({'state': {index: ...}, 'param_groups': [{'params': [index, ...]}]})",
              state.get("optimizer"))
    _check_generators(state.get("rng"), sampler["generator"], file)


def _is_scaler(scaler) -> bool:
    keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    return isinstance(scaler, dict) and (not scaler or (keys <= set(scaler) and all(
        (isinstance(scaler[k], float) and math.isfinite(scaler[k])) or _is_int(scaler[k]) for k in keys)))


def _is_optimizer(optimizer) -> bool:
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        return False
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and _is_ints(g.get("params")) for g in groups):
        return False
    return all(_is_int(k) and isinstance(v, dict) for k, v in optimizer["state"].items())


def _check_generators(rng, sampler_generator: torch.Tensor, file: Path) -> None:
    """Each generator state set on a scratch generator of its kind: what would fail the resume fails here."""
    _need(file, "rng", isinstance(rng, dict) and _is_bytes(rng.get("torch")) and isinstance(rng.get("python"), list | tuple)
          and isinstance(rng.get("numpy"), list | tuple) and len(rng["python"]) == 3 and len(rng["numpy"]) == 5,
          "an object with the torch, python and numpy generator states", rng)
    cuda = rng.get("cuda", [])
    _need(file, "rng.cuda", isinstance(cuda, list | tuple) and all(_is_bytes(t) for t in cuda),
          "a list of generator states", cuda)
    version, internal, gauss = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    checks = {
        "sampler.generator": lambda: torch.Generator().set_state(sampler_generator),
        "rng.torch": lambda: torch.Generator().set_state(rng["torch"]),
        "rng.python": lambda: random.Random().setstate((version, tuple(internal), gauss)),
        "rng.numpy": lambda: np.random.RandomState().set_state(
            (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)),
    }
    for field, check in checks.items():
        try:
            check()
        except (TypeError, ValueError, RuntimeError, OverflowError, IndexError, KeyError) as err:
            raise FormatError(f"{file}: malformed trainer state: {field} is not a generator state "
                              f"({one_line(err)})") from err
