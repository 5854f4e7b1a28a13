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

Integrity (docs/reliability.md): a checkpoint's manifest.json and a compressed export's slope_model.json
list every other file of their folder with its size and SHA-256 (`check_digests`: a file missing, altered,
or present but not listed is refused), and slope_model.json carries the SHA-256 of its own bytes
(`sealed_json`, `check_sealed`). Nothing a file says, its format version included, is believed before
these checks pass. They catch corruption, truncated copies and the edit of a file; they are not
signatures: whoever edits a file and recomputes the checksums is not caught.

Every JSON file slope reads goes through `read_json` (UTF-8, at most MAX_JSON_DEPTH levels deep), and every
loader checks the stored masks of each sparse layer with `mask_findings`, as `slope check` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from slope.config import SlopeConfig


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
# slope_model.json's last field: the SHA-256 of the file's bytes, read with this field's value as 64 zeros
META_CHECKSUM_KEY = "metadata_sha256"
# Hugging Face folders: pickled weights, which slope never reads (transformers' names)
PICKLE_WEIGHTS_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# No JSON file slope writes nests deeper than a dozen levels; deeper ones are refused before anything
# recursive (the trainer state's decoder, transformers' config classes) sees them.
MAX_JSON_DEPTH = 100

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


def check_dtype_arg(function: str, dtype) -> None:
    """TypeError / ValueError, in one line naming `function`'s `dtype` argument, unless it is None or a
    dtype the formats store (DTYPES)."""
    allowed = ", ".join(f"torch.{name}" for name in DTYPES)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{function}: dtype must be one of {allowed} or None, got {type(dtype).__name__} {dtype!r}")
    if dtype is not None and dtype not in DTYPES.values():
        raise ValueError(f"{function}: dtype must be one of {allowed} or None, got {dtype}")


def check_export_args(function: str, model, tokenizer, dtype) -> None:
    """TypeError / ValueError, in one line naming the argument and what is allowed, for what an export
    (`function`) cannot write: before anything is written."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"{function}: model must be a transformers model (a torch.nn.Module with a .config), "
                        f"got {type(model).__name__}")
    if next(iter(model.parameters()), None) is None:
        raise ValueError(f"{function}: model has no parameters to write")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"{function}: tokenizer must be a transformers tokenizer or None, got {type(tokenizer).__name__}")
    check_dtype_arg(function, dtype)


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


def read_json(file: Path, what: str):
    """The JSON document in `file` (`what` names it in messages: "the checkpoint manifest").

    FormatError, in one line naming the file, for anything but UTF-8 JSON nested at most MAX_JSON_DEPTH
    levels (`loads_json`): unreadable, not UTF-8 (a byte-order mark included), not JSON, too deep, a number
    too long to convert or not finite (NaN, 1e400). A RecursionError never escapes.
    """
    try:
        data = Path(file).read_bytes()
    except OSError as err:
        raise FormatError(f"{file}: cannot read {what} ({one_line(err)})") from err
    return parse_json(data, file, what)


def parse_json(data: bytes, file: Path, what: str):
    """`read_json` of the bytes `data` read from `file`."""
    try:
        return loads_json(data)
    except ValueError as err:
        raise FormatError(f"{file}: cannot read {what} ({err})") from err


def loads_json(data: bytes):
    """The JSON document in the bytes `data`; ValueError, in one line, for anything but UTF-8 JSON nested at
    most MAX_JSON_DEPTH levels: not UTF-8 (a byte-order mark included), not JSON, too deep, a number too
    long to convert, and NaN, Infinity or a number beyond a float's range (1e400), which Python's json
    accepts but JSON has not (slope writes none). A RecursionError never escapes."""
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_not_a_number, parse_float=_finite_float)
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text: byte {err.start} is invalid") from err
    except RecursionError as err:
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from err
    # ValueError itself: JSONDecodeError, an integer of more digits than Python converts, NaN
    if _too_deep(doc):
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return doc


def _not_a_number(token: str):
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"the number {token[:40]} is beyond the range of a float")
    return value


def _too_deep(doc) -> bool:
    stack = [(doc, 1)]
    while stack:  # iterative: the depth being checked must not cost recursion
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > MAX_JSON_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def folder_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every entry under `folder` but its directories, sorted: the files, and
    links of any kind (a linked directory is one entry, not followed)."""
    folder = Path(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        found += [(base / name).relative_to(folder).as_posix() for name in files]
        found += [(base / name).relative_to(folder).as_posix() for name in dirs if (base / name).is_symlink()]
    return sorted(found)


def file_digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `folder` except the relative paths in `skip`."""
    folder = Path(folder)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in folder_files(folder) if name not in skip}


def check_digests(folder: Path, files: dict, listing: Path) -> None:
    """`files` (as `file_digests` returns) lists every file of `folder` but `listing`, each with its size and SHA-256.

    `listing` is the file that holds the list, named in the messages. FormatError, in one line, at the
    first file that is missing, outside the folder, truncated or corrupted, and then at the first file of
    the folder that the list leaves out (added to the folder, or its entry deleted).
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
    own = Path(listing).relative_to(folder).as_posix()
    for name in folder_files(folder):
        if name not in files and name != own:
            raise FormatError(f"{Path(folder) / name} is not listed in {listing}, which lists every file of "
                              "the folder: the file was added, or its entry removed")


def check_manifest(folder: Path, file: Path, version: int, required: tuple[str, ...]) -> None:
    """`file` (a checkpoint's manifest.json: {"format", "files"}) is of format `version`, `check_digests`
    passes for it, and it lists the `required` files: FormatError, in one line, at the first failure."""
    manifest = read_json(file, "the checkpoint manifest")
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != version:
        newer = isinstance(found, int) and not isinstance(found, bool) and found > version
        raise FormatError(f"{file}: manifest format {found!r}, but this slope reads checkpoint format {version}"
                          + (": upgrade slope" if newer else ""))
    files = manifest.get("files")
    check_digests(folder, files, file)
    missing = [name for name in required if name not in files]
    if missing:  # neither there nor listed
        raise FormatError(f"{file}: the manifest does not list {', '.join(missing)}, which every checkpoint holds")


def sealed_json(doc: dict, key: str) -> str:
    """`doc` as JSON text (indent 1) with `key` added last, holding the SHA-256 of the whole text as it
    reads with that value replaced by 64 zeros: the file carries its own checksum (`check_sealed`)."""
    zeros = "0" * 64
    text = json.dumps({**doc, key: zeros}, indent=1) + "\n"  # ASCII: non-ASCII characters are escaped
    head, _, tail = text.rpartition(zeros)
    return head + hashlib.sha256(text.encode()).hexdigest() + tail


def check_sealed(file: Path, raw: bytes, doc: dict, key: str) -> None:
    """FormatError unless `raw`, the bytes of `file` (parsed: `doc`), passes the checksum `sealed_json`
    wrote under `key`: any changed byte of the file fails it."""
    digest = doc.get(key)
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise FormatError(f"{file}: {key} must be 64 hexadecimal digits, got {str(digest)[:80]!r}")
    head, found, tail = raw.rpartition(f'"{digest}"'.encode())
    if not found or hashlib.sha256(head + b'"' + b"0" * 64 + b'"' + tail).hexdigest() != digest:
        raise FormatError(f"{file} fails its own SHA-256 check ({key}): the file is corrupted or was edited")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- the stored masks of a sparse layer -------------------------------------------------------------

_BITS_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_COUNTERS = "[mask_steps, column_mask_step, rank]"


def mask_findings(
    read: Callable[[str], torch.Tensor | None], prefix: str, n: int, m: int, double_prune: bool,
) -> list[str]:
    """What is wrong with the stored masks and step counters of the sparse layer saved under `prefix`
    ("model.layers.0.mlp.up_proj."), whose state_dict entries `read(key)` returns (None when absent);
    empty when nothing is. The one check of SlopeLinear's storage (slope.linear): every loader runs it
    (`check_model_masks`, `check_file_masks`), and `slope check` reports what it finds.

        - shapes: values (out, in·n/m), row bits (out, in/m), and column bits (out/m, in) exactly
          when double pruning is on;
        - M_R keeps exactly n of every m along `in` (no stray bits above the m positions);
        - the step counters [mask_steps, column_mask_step, rank]: mask_steps >= 0, -1 <= column_mask_step
          <= mask_steps (-1: M_C not computed yet), rank >= 0;
        - M_C, once computed, keeps exactly n of every m along `out`, and only where M_R keeps a weight
          (W_RC ⊆ W_R), unless fewer than n of that column group are kept at all.
    Only the shape of the values is looked at (`read` may return a meta tensor for them).
    """
    name = prefix[:-1]
    values, rows, cols, counters = (read(prefix + part) for part in ("weight", "row_bits", "col_bits", "mask_state"))
    if values is None or rows is None:
        return [f"{name}: the kept values (weight) or the row mask (row_bits) are not stored"]
    if rows.dim() != 2 or rows.dtype not in _BITS_DTYPES:
        return [f"{name}: row bits are a {rows.dtype} tensor of shape {tuple(rows.shape)}, expected 2-D integers"]
    if double_prune != (cols is not None):
        return [f"{name}: column bits (col_bits) are {'missing' if double_prune else 'stored'}, but double "
                f"pruning is {'on' if double_prune else 'off'}"]
    out_f, in_f = rows.shape[0], rows.shape[1] * m
    shapes = {"values": (values, (out_f, in_f * n // m))}
    if cols is not None:
        shapes["column bits"] = (cols, (out_f // m, in_f))
    wrong = [f"{name}: {what} have shape {tuple(t.shape)}, expected {shape}"
             for what, (t, shape) in shapes.items() if tuple(t.shape) != shape]
    if cols is not None and (out_f % m or cols.dtype not in _BITS_DTYPES):
        wrong.append(f"{name}: column bits are a {cols.dtype} tensor for out={out_f}, expected integers and out a "
                     f"multiple of m={m}")
    if wrong:
        return wrong
    found, column_step = _counter_findings(name, counters)
    work = torch.int32 if m < 31 else torch.int64  # room for the bits above the m positions
    shifts = torch.arange(m, dtype=work)
    rows = rows.to(work)
    row_kept = (rows.unsqueeze(-1) >> shifts) & 1  # (out, in/m, m)
    bad = ((rows >> m) != 0) | (row_kept.sum(-1) != n)
    if bad.any():
        found.append(f"{name}: {int(bad.sum())} row group(s) of M_R do not keep exactly {n} of {m}")
    if cols is not None and column_step >= 0:  # M_C computed (it is built on the first training step)
        found += _column_findings(name, cols.to(work), row_kept.reshape(out_f, in_f), n, m)
    return found


def _counter_findings(name: str, counters: torch.Tensor | None) -> tuple[list[str], int]:
    """(findings, column_mask_step) of the stored step counters; -1 when they cannot be read."""
    if counters is None:
        return [f"{name}: the step counters {_COUNTERS} (mask_state) are not stored"], -1
    if tuple(counters.shape) != (3,) or counters.dtype not in _BITS_DTYPES:
        return [f"{name}: the step counters (mask_state) are a {counters.dtype} tensor of shape "
                f"{tuple(counters.shape)}, expected 3 integers {_COUNTERS}"], -1
    steps, column_step, rank = (int(v) for v in counters.tolist())
    if steps < 0 or not -1 <= column_step <= steps or rank < 0:
        return [f"{name}: step counters (mask_steps={steps}, column_mask_step={column_step}, rank={rank}) are "
                "invalid: expected mask_steps >= 0, -1 <= column_mask_step <= mask_steps and rank >= 0"], -1
    return [], column_step


def _column_findings(name: str, cols: torch.Tensor, row_dense: torch.Tensor, n: int, m: int) -> list[str]:
    """M_C (out/m, in) against n:m along `out` and against M_R (`row_dense`, 0/1 (out, in))."""
    out_f, in_f = row_dense.shape
    shifts = torch.arange(m, dtype=cols.dtype)
    col_kept = (cols.unsqueeze(1) >> shifts.view(1, m, 1)) & 1  # (out/m, m, in): bit i = row g·m + i
    found = []
    bad = ((cols >> m) != 0) | (col_kept.sum(1) != n)
    if bad.any():
        found.append(f"{name}: {int(bad.sum())} column group(s) of M_C do not keep exactly {n} of {m}")
    row_groups = row_dense.view(out_f // m, m, in_f)
    both = (col_kept & row_groups).sum(1)
    # Where a column group keeps fewer than n weights of W_R, M_C also marks zeros of W_R: harmless.
    expected = row_groups.sum(1).clamp(max=n)
    if (both != expected).any():
        found.append(f"{name}: {int((both != expected).sum())} column group(s) of M_C keep positions W_R does "
                     "not (W_RC ⊄ W_R)")
    return found


def check_model_masks(model: torch.nn.Module, where: Path) -> None:
    """FormatError, in one line naming `where` (the file the model was read from), when a sparse layer of
    the loaded `model` breaks a rule of `mask_findings`."""
    from slope.convert import slope_layers

    layers = slope_layers(model)
    state = model.state_dict() if layers else {}
    _refuse(where, [finding for name, layer in layers for finding in mask_findings(
        state.get, f"{name}.", layer.config.n, layer.config.m, layer.config.double_prune)])


def check_state_masks(read: Callable[[str], torch.Tensor | None], keys, n: int, m: int, double_prune: bool,
                      where: Path) -> None:
    """`mask_findings` for every sparse layer (a `NAME.row_bits` among `keys`) of a state_dict as it was
    saved, whose entries `read(key)` returns: FormatError, in one line naming `where`, on any finding."""
    _refuse(where, [finding for key in sorted(keys) if key.endswith(".row_bits")
                    for finding in mask_findings(read, key.removesuffix("row_bits"), n, m, double_prune)])


def check_file_masks(weights: Path, n: int, m: int, double_prune: bool) -> None:
    """`check_state_masks` of the state_dict saved in the safetensors file `weights`, without building the
    model (the values are read by shape only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            keys = set(f.keys())

            def read(key: str) -> torch.Tensor | None:
                if key not in keys:
                    return None
                if key.endswith(".weight"):  # the values: their shape is enough
                    return torch.empty(f.get_slice(key).get_shape(), device="meta")
                return f.get_tensor(key)

            check_state_masks(read, keys, n, m, double_prune, weights)
    except (OSError, SafetensorError) as err:
        raise FormatError(f"{weights}: cannot read it ({one_line(err)})") from err


def check_checkpoint_masks(weights: Path, info: dict) -> None:
    """`check_file_masks` of a checkpoint's model.safetensors with the N:M of its slope.json (`info`); nothing
    for a dense checkpoint, or an SR-STE one (prune_on_load: its weights are dense, its masks computed on load)."""
    config = info.get("slope_config")
    if config is not None and not info.get("prune_on_load", False):
        config = SlopeConfig(**config)  # checked by the reader of slope.json; a key it left out has its default
        check_file_masks(weights, config.n, config.m, config.double_prune)


def _refuse(where: Path, findings: list[str]) -> None:
    if findings:
        more = f"; and {len(findings) - 5} more" if len(findings) > 5 else ""
        raise FormatError(f"{where}: " + "; ".join(findings[:5]) + more)
