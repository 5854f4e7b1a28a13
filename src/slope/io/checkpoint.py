"""Training checkpoints: the one writer (`save_checkpoint`), the one resolver and the one reader.

RUN_DIR/checkpoints/step_XXXXXXXX/ holds (file names in slope.io.format), in format 2:
    model.safetensors          the full model state_dict (SlopeLinear kept values, masks and step counters)
    config.json                the Hugging Face model config
    slope.json                 {"format", "method", "slope_config", "adapters", "adapter_rank", "step"}
    tokenizer/                 the tokenizer (save_pretrained)
    trainer_state.json         the trainer state's plain data; each tensor is a {"__tensor__": key} there
    trainer_state.safetensors  the trainer state's tensors (optimizer moments, RNG states)
    config.toml                the resolved run config
    dcp/                       FSDP runs only: the sharded model and optimizer state, written by every rank
                               with torch.distributed.checkpoint (DCP), which reshards on load to any world size
    manifest.json              size and SHA-256 of every other file of the folder (dcp/ included), written last
In an FSDP run model.safetensors is the consolidated model, gathered to rank 0, so export, eval and
slope.load read FSDP checkpoints like any other, and trainer_state holds no optimizer (it is in dcp/).
slope.io.trainer_state encodes the trainer state; slope.io.sharded_state writes and reads dcp/.
Nothing is pickled: a checkpoint is data, and reading one runs no code from it. Every reader checks the whole
folder against the manifest before it believes any file of it (`verify_checkpoint`); resume also the trainer
state and the masks (`check_for_resume`); `slope check` all of it (`check_checkpoint`). Format 1 (slope 0.1:
trainer_state.pt, a pickle, no manifest) is refused in one line, before any other file is read.

In a run of several processes rank 0 alone writes and renames; the others write only their dcp/
shards (FSDP) or nothing (DDP, whose checkpoint is the single-process one), and every rank waits for
the rename before going on.

Each checkpoint is written as checkpoints/.tmp-step_XXXXXXXX (complete once its manifest is there)
and renamed into place; the same step written again moves the old copy to .old-step_XXXXXXXX first.
A kill at any point leaves one intact copy of every step under one of those three names, and
`list_checkpoints` finds it; `checkpoints/latest` (a one-line file naming the newest complete
checkpoint) is replaced atomically and is only a hint: a name that is not a step directory of this
run is ignored.

The model is rebuilt from these files alone, without the training code: `slope_config` null means
a dense model; otherwise the model is sparsified with that SlopeConfig, and each layer gets
adapters of the rank its `mask_state` records. `prune_on_load: true` (an SR-STE run, whose layers
train dense weights through their N:M magnitude mask) means model.safetensors is the dense model: it
is loaded first and then sparsified with `slope_config`, whose magnitude masks are the trained masks,
so every reader sees the pruned model (resume reads the dense weights itself). `method` only names how
the run trained: a method this version does not know still loads when its files have this shape, and
strict loading of the weights refuses any that do not.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import safetensors.torch
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
    MANIFEST_FILE,
    RUN_CONFIG_FILE,
    SHARDED_DIR,
    TOKENIZER_DIR,
    TRAINER_STATE_FILE,
    TRAINER_TENSORS_FILE,
    WEIGHTS_FILE,
    FormatError,
    UnsupportedFormatError,
    check_checkpoint_masks,
    check_manifest,
    file_digests,
    one_line,
    read_json,
)

# The trainer saves and resumes the dcp/ part of a checkpoint through this module, like the rest of it.
from slope.io.sharded_state import has_sharded_state, load_sharded_state, save_sharded_state  # noqa: F401
from slope.io.trainer_state import load_trainer_state, read_resume_state, write_trainer_state  # noqa: F401
from slope.linear import SlopeLinear

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_LEFTOVER = re.compile(r"^\.(tmp|old)-(step_\d{8})$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); nothing half-written is left behind."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- writing ----------------------------------------------------------------------------------


class _OneProcess:
    """The `ranks` of a single-process run: itself the writer, nothing to wait for."""

    main = True

    def barrier(self) -> None:
        pass

    def broadcast(self, obj):
        return obj


def save_checkpoint(
    run_dir: Path, step: int, model, tokenizer, method_info: dict, run_config_toml: str,
    trainer_state: dict, keep_last: int, *, ranks=None, weights: tuple[dict, dict] | None = None, sharded=None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, delete all but the newest `keep_last`.

    ranks: in a run of several processes, an object with `main`, `barrier()` and `broadcast(obj)`
    (rank 0's obj on every rank); every rank calls this, rank 0 alone writes the files below.
    weights: (state_dict, safetensors metadata) to write as model.safetensors instead of `model`'s own
    (the consolidated state of an FSDP model, as save_model would write it; rank 0's only).
    sharded: called by every rank with the dcp/ folder to write its shards into (FSDP), before rank 0
    writes the rest.

    CheckpointWriteError (one line, on every rank) when the disk is full or not writable; the
    temporary directory is removed and the checkpoints already there are untouched.
    """
    ranks = ranks or _OneProcess()
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"

    def failed(err: BaseException) -> str:
        if ranks.main:
            _discard_partial(root, tmp)
        return _failure_message(final, err)

    def write_and_swap_in() -> None:
        _write_files(tmp, step, model, tokenizer, method_info, run_config_toml, trainer_state, weights)
        _swap_in(root, tmp, final)
        _write_latest(root, final.name)

    _write_on_rank0(ranks, lambda: _start_tmp(root, tmp), failed)
    if sharded is not None:
        try:  # collective: each rank writes its shards, rank 0 the metadata once all are written
            sharded(tmp / SHARDED_DIR)
        except Exception as err:  # DCP raises one CheckpointException on every rank, whatever failed
            raise CheckpointWriteError(failed(err)) from err
    ranks.barrier()  # every rank's files are in tmp before rank 0 makes it the checkpoint
    _write_on_rank0(ranks, write_and_swap_in, failed)
    if ranks.main:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(stale)
    ranks.barrier()  # nobody starts the next step (or the next checkpoint) before this one is in place
    return final


def _write_on_rank0(ranks, write, failed) -> None:
    """`write()` on rank 0 and its outcome on every rank: all go on, or all raise the same CheckpointWriteError
    (failed(err) turns rank 0's storage error into the one line every rank raises)."""
    error, cause = None, None
    if ranks.main:
        try:
            write()
        except (OSError, SafetensorError) as err:  # safetensors' writer gives the OS's error in its message only
            if not isinstance(err, OSError) and not re.search(r"I/O error|IoError", str(err)):
                raise
            error, cause = failed(err), err
    error = ranks.broadcast(error)
    if error is not None:
        raise CheckpointWriteError(error) from cause


def _failure_message(final: Path, err: BaseException) -> str:
    full = getattr(err, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err)
    reason = "the disk is full" if full else one_line(err)
    return f"cannot write checkpoint {final} ({reason}); the previous checkpoints are intact"


def _start_tmp(root: Path, tmp: Path) -> None:
    """An empty `tmp` to write into, once any swap a kill interrupted is finished."""
    root.mkdir(parents=True, exist_ok=True)
    _recover(root)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()


def _discard_partial(root: Path, tmp: Path) -> None:
    """Remove what a failed write left: the temporary checkpoint and the temporary `latest`."""
    shutil.rmtree(tmp, ignore_errors=True)
    (root / f".{LATEST_FILE}.tmp").unlink(missing_ok=True)


def _write_files(
    folder: Path, step: int, model, tokenizer, method_info: dict, run_config_toml: str, trainer_state: dict,
    weights: tuple[dict, dict] | None = None,
) -> None:
    if weights is None:
        safetensors.torch.save_model(model, str(folder / WEIGHTS_FILE))
    else:
        safetensors.torch.save_file(weights[0], str(folder / WEIGHTS_FILE), metadata=weights[1])
    model.config.save_pretrained(str(folder))
    info = {"format": CHECKPOINT_FORMAT, **method_info, "step": step}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    write_trainer_state(folder, trainer_state)
    (folder / RUN_CONFIG_FILE).write_text(run_config_toml)
    # Last: a .tmp- directory with a manifest is complete, which is what lets a reader recover it.
    manifest = {"format": CHECKPOINT_FORMAT, "files": file_digests(folder)}
    _write_durably(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def _write_durably(file: Path, text: str) -> None:
    with open(file, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _swap_in(root: Path, tmp: Path, final: Path) -> None:
    if final.exists():  # the same step written again (e.g. after a resume): swap, then drop the old one
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def _recover(root: Path) -> None:
    """Finish a swap a kill interrupted: put each step's intact leftover in place, drop the rest."""
    # ".tmp-" before ".old-": of two complete copies of one step, the newer is put in place
    for leftover in sorted(root.iterdir(), reverse=True):
        match = _LEFTOVER.match(leftover.name)
        if match is None or not leftover.is_dir() or leftover.is_symlink():
            continue
        final = root / match.group(2)
        if not final.exists() and _leftover_complete(leftover):
            os.rename(leftover, final)
        else:
            shutil.rmtree(leftover)


def _leftover_complete(path: Path) -> bool:
    # a .tmp- copy is complete once its manifest is written; an .old- copy was complete when moved aside
    return (path / (MANIFEST_FILE if path.name.startswith(".tmp-") else INFO_FILE)).is_file()


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST_FILE}.tmp"
    _write_durably(tmp, name + "\n")
    os.replace(tmp, root / LATEST_FILE)


# ---- checking a checkpoint ------------------------------------------------------------------------


def verify_checkpoint(checkpoint_dir: str | Path) -> dict:
    """slope.json of a checkpoint, read once every file of the folder has passed the manifest: FormatError,
    in one line, for a file missing, truncated, corrupted or not listed, another manifest format, a folder
    named for another step. Without a manifest, slope.json is read only to refuse it (slope 0.1's format 1,
    which had none, as unsupported)."""
    ckpt = Path(checkpoint_dir)
    if not (ckpt / MANIFEST_FILE).is_file():
        read_info(ckpt)  # UnsupportedFormatError for slope 0.1's format; "upgrade slope" for a newer one
        raise FormatError(f"{ckpt / MANIFEST_FILE} is missing: every checkpoint of format {CHECKPOINT_FORMAT} "
                          "lists its files there")
    required = (WEIGHTS_FILE, INFO_FILE, HF_CONFIG_FILE, TRAINER_STATE_FILE, TRAINER_TENSORS_FILE)
    check_manifest(ckpt, ckpt / MANIFEST_FILE, CHECKPOINT_FORMAT, required)
    try:
        info = read_info(ckpt)
    except UnsupportedFormatError as err:  # format 1 never had a manifest: this slope.json was edited
        raise FormatError(f"{ckpt / INFO_FILE}: format {CHECKPOINT_FORMAT - 1} in a checkpoint with a "
                          f"format-{CHECKPOINT_FORMAT} manifest: the file was edited") from err
    named = _STEP_DIR.match(_LEFTOVER.sub(r"\2", ckpt.name))
    if named and int(named.group(1)) != info["step"]:
        raise FormatError(f"{ckpt}: the folder is named for step {int(named.group(1))}, but {INFO_FILE} records "
                          f"step {info['step']}")
    return info


def check_for_resume(checkpoint_dir: str | Path) -> tuple[dict, dict]:
    """(slope.json, trainer state) of a checkpoint, after every check a resume makes: the manifest
    (`verify_checkpoint`), then the trainer state and the stored masks (`read_resume_state`)."""
    info = verify_checkpoint(checkpoint_dir)
    return info, read_resume_state(Path(checkpoint_dir), info, sharded=has_sharded_state(checkpoint_dir))


def check_checkpoint(checkpoint_dir: str | Path) -> None:
    """Every check a reader of one checkpoint makes, each file hashed once (`slope check`): those of a
    resume (`check_for_resume`), then the model built as `load_checkpoint` builds it."""
    _build(Path(checkpoint_dir), check_for_resume(checkpoint_dir)[0])


def load_for_resume(run_dir: Path) -> tuple[Path, dict]:
    """(checkpoint, trainer state) of the newest checkpoint of a run that passes `check_for_resume`.

    The one `latest` names comes first; a damaged one is skipped with a warning naming the one used
    instead. FileNotFoundError when the run has no checkpoint; FormatError when none is intact, and
    UnsupportedFormatError at once when one is of slope 0.1's format 1.
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to resume from")
    candidates = [newest] + [p for p in reversed(list_checkpoints(run_dir)) if p != newest]
    damaged: dict[str, FormatError] = {}
    for ckpt in candidates:
        try:
            info, state = check_for_resume(ckpt)
        except UnsupportedFormatError:
            raise  # slope 0.1's format: an older checkpoint would be no better, so the run is refused
        except FormatError as err:
            log.warning("checkpoint %s is damaged, not resuming from it: %s", ckpt.name, err)
            damaged[ckpt.name] = err
            continue
        if damaged:
            log.warning("resuming from %s (step %d) instead: %s failed the checks", ckpt.name, info["step"],
                        ", ".join(damaged))
        return ckpt, state
    raise FormatError(f"{run_dir}: no intact checkpoint to resume from ({', '.join(damaged)} failed the checks; "
                      f"{newest.name}: {damaged[newest.name]})")


# ---- finding a checkpoint -----------------------------------------------------------------------


def is_checkpoint_or_run(path: str | Path) -> bool:
    """Whether `path` looks like a checkpoint directory or a run directory (`resolve_checkpoint` decides)."""
    path = Path(path)
    return (path / INFO_FILE).is_file() or (path / CHECKPOINTS_DIR).is_dir()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first.

    A step whose swap a kill interrupted counts by its intact leftover (.tmp- with a manifest, or
    .old-); directories that resolve outside the run (symlinks) are not followed.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    inside = root.resolve()
    found: dict[str, Path] = {}
    for p in root.iterdir():
        if not p.resolve().is_relative_to(inside):
            continue
        if _STEP_DIR.match(p.name) and (p / INFO_FILE).is_file():
            found[p.name] = p
    leftovers: dict[str, Path] = {}
    for p in sorted(root.iterdir()):  # ".old-" sorts before ".tmp-": a complete .tmp- copy is newer and wins
        match = _LEFTOVER.match(p.name)
        if match and p.resolve().is_relative_to(inside) and _leftover_complete(p):
            leftovers[match.group(2)] = p
    found = {**leftovers, **found}
    return [found[name] for name in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names; if that file is missing, stale or names anything but a step
    directory of this run, the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    found = list_checkpoints(run_dir)
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if _STEP_DIR.match(name):
            named = [p for p in found if _LEFTOVER.sub(r"\2", p.name) == name]
            if named:
                return named[0]
        else:
            log.warning("%s names %r, which is not a checkpoint of this run: ignored", pointer, name[:200])
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
    """slope.json of a checkpoint directory, checked: FormatError if unreadable or of another format."""
    file = Path(checkpoint_dir) / INFO_FILE
    info = read_json(file, "the checkpoint info")
    if not isinstance(info, dict):
        raise FormatError(f"{file}: expected a JSON object, got {type(info).__name__}")
    version = info.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{file}: invalid format {version!r} (expected the integer {CHECKPOINT_FORMAT})")
    if version > CHECKPOINT_FORMAT:
        raise FormatError(
            f"{file} has format {version}; this version of slope reads checkpoint formats up to "
            f"{CHECKPOINT_FORMAT}: upgrade slope"
        )
    if version < CHECKPOINT_FORMAT:
        raise UnsupportedFormatError(
            f"{file} has checkpoint format {version}, which this version of slope does not read (it reads "
            f"format {CHECKPOINT_FORMAT} only; format 1 was written by slope 0.1)"
        )
    if "slope_config" not in info:  # a damaged file is a FormatError, never a KeyError (tests/io/test_fuzz_readers.py)
        raise FormatError(f"{file}: missing field 'slope_config' (an object, or null for a dense model)")
    if not isinstance(info["slope_config"], dict | None):
        raise FormatError(f"{file}: slope_config must be an object or null, got {info['slope_config']!r}")
    if info["slope_config"] is not None:
        try:  # the same check for load and resume: a config this slope would refuse is a damaged file
            SlopeConfig(**info["slope_config"])
        except (TypeError, ValueError) as err:
            raise FormatError(f"{file}: invalid slope_config ({one_line(err)})") from err
    prune_on_load = info.get("prune_on_load", False)
    if not isinstance(prune_on_load, bool) or (prune_on_load and info["slope_config"] is None):
        raise FormatError(f"{file}: prune_on_load must be true or false, and true only with a slope_config; "
                          f"got {prune_on_load!r}")
    step = info.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise FormatError(f"{file}: step must be an integer >= 0, got {step!r}")
    return info


def load_checkpoint(path: str | Path) -> tuple[nn.Module, object, dict]:
    """(model, tokenizer, slope.json contents) of a checkpoint or of a run's latest one; CPU, eval mode.

    FileNotFoundError when there is no checkpoint at `path`; FormatError when one of its files is
    missing, fails its manifest check, is of a newer format, or does not fit the others.
    """
    ckpt = resolve_checkpoint(path)
    info = verify_checkpoint(ckpt)
    model, tokenizer = _build(ckpt, info)
    return model, tokenizer, info


def _build(ckpt: Path, info: dict) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a verified checkpoint; FormatError when its files do not fit together or a
    sparse layer's masks break a rule of `slope.io.format.mask_findings`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for part in (HF_CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR):
        if not (ckpt / part).exists():
            raise FormatError(f"{ckpt / part} is missing: a checkpoint holds {HF_CONFIG_FILE}, {WEIGHTS_FILE} and "
                              f"{TOKENIZER_DIR}/")
    read_json(ckpt / HF_CONFIG_FILE, "the model config")  # too deep, not UTF-8: one line naming the file
    try:
        config = AutoConfig.from_pretrained(ckpt, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(ckpt / TOKENIZER_DIR, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # transformers and tokenizers raise what a damaged file makes them meet (TypeError, ...)
        raise FormatError(f"{ckpt}: cannot read {HF_CONFIG_FILE} or {TOKENIZER_DIR}/ ({one_line(err)})") from err
    weights = ckpt / WEIGHTS_FILE
    prune_on_load = info.get("prune_on_load", False)
    if info.get("slope_config") is not None and not prune_on_load:
        _sparsify_as_saved(model, info, ckpt)
    # strict: every tensor present with its shape, or a clear error before the model is returned
    try:
        if info.get("adapters"):
            _add_adapters_as_saved(model, weights)
        safetensors.torch.load_model(model, weights, strict=True)
    except (RuntimeError, OSError, ValueError, IndexError, SafetensorError) as err:
        raise FormatError(f"{weights} does not fit the checkpoint's {INFO_FILE} and {HF_CONFIG_FILE}: "
                          f"{one_line(err)}") from err
    if prune_on_load:
        _sparsify_as_saved(model, info, ckpt)  # from the loaded dense weights: their magnitude masks
    check_checkpoint_masks(weights, info)  # as saved: what resume reads too
    return model.eval(), tokenizer


def _sparsify_as_saved(model: nn.Module, info: dict, ckpt: Path) -> None:
    try:
        sparsify(model, SlopeConfig(**info["slope_config"]))
    except (TypeError, ValueError) as err:
        raise FormatError(f"{ckpt / INFO_FILE}: slope_config does not apply to this model ({one_line(err)})") from err


def _add_adapters_as_saved(model: nn.Module, weights: Path) -> None:
    # Each layer's state_dict records its rank; add_adapter derives the scale from the layer config and
    # rank exactly as it did when training added the adapters.
    with safe_open(weights, framework="pt") as f:
        for name, layer in slope_layers(model):
            rank = SlopeLinear.saved_rank(f.get_tensor, f"{name}.")
            if rank:
                layer.add_adapter(rank)

