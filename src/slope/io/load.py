"""Loading a model for inference: `slope.load(DIR)`, its tokenizer, and the compressed export reader.

`load` accepts a compressed export (slope_model.json), a training run or checkpoint directory
(read by slope.io.checkpoint) or a plain Hugging Face model directory (config.json). The model is
built completely on the CPU and checked before anything is returned, so a bad file never yields a
half-loaded model. Which device and half-precision dtype to use is slope.devices' decision.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from slope.config import SlopeConfig
from slope.convert import (
    HF_CONFIG_FORMAT,
    HF_CONFIG_KEY,
    SparsifyReport,
    dense_equivalent_params,
    for_inference,
    guard_lora_targets,
    replace_module,
    slope_layers,
)
from slope.devices import half_dtype, resolve_device
from slope.io import checkpoint
from slope.io.format import (
    DTYPES,
    EXPORT_FORMAT_NAME,
    EXPORT_FORMAT_VERSION,
    EXPORT_WEIGHTS_FILE,
    HF_CONFIG_FILE,
    INFO_FILE,
    META_CHECKSUM_KEY,
    META_FILE,
    PICKLE_WEIGHTS_FILES,
    SERVE_FORMAT,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    FormatError,
    UnsupportedFormatError,
    check_digests,
    check_model_masks,
    check_sealed,
    check_state_masks,
    confined,
    one_line,
    parse_json,
    read_json,
)
from slope.io.packing import code_bits, unpack_positions
from slope.io.serve import rebuild_serving
from slope.linear import SlopeLinear, dense_weight_of

__all__ = [
    "FormatError", "ModelDir", "load", "load_compressed", "load_tokenizer", "read_metadata", "resolve_model_dir",
    "verify_files",
]

# transformers.Trainer writes OUTPUT_DIR/checkpoint-N/; slope's SlopeCallback keeps a compressed export
# of each in checkpoint-N/slope/ (slope.train.hf_trainer), the copy every command reads.
TRAINER_EXPORT_DIR = "slope"


@dataclass(frozen=True)
class ModelDir:
    """The directory that holds a model, and its kind: "export", "checkpoint" or "huggingface"."""

    kind: str
    path: Path


def resolve_model_dir(path: str | Path) -> ModelDir:
    """What `path` holds; a run directory resolves to its latest checkpoint.

    FileNotFoundError when `path` does not exist or holds none of the three kinds.
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        return ModelDir("export", path)
    if (path / TRAINER_EXPORT_DIR / META_FILE).is_file():  # a Trainer checkpoint-N/ with SlopeCallback
        return ModelDir("export", path / TRAINER_EXPORT_DIR)
    if checkpoint.is_checkpoint_or_run(path):
        return ModelDir("checkpoint", checkpoint.resolve_checkpoint(path))
    if (path / HF_CONFIG_FILE).is_file():
        return ModelDir("huggingface", path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(
        f"{path}: not a slope export ({META_FILE}), a training run/checkpoint (checkpoints/ or {INFO_FILE}) "
        f"or a Hugging Face model directory ({HF_CONFIG_FILE})"
    )


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = "auto",
    backend: str = "auto",
    inference: bool = False,
) -> nn.Module:
    """A ready transformers model (eval mode) from an export, a training run/checkpoint or a HF directory.

    device: "auto" or None: CUDA when available, else CPU (slope.devices.resolve_device; ValueError for
        a device this machine does not have).
    dtype: "auto" keeps the stored dtype, except that fp32 weights on CUDA run in the GPU's 16-bit
        dtype (slope.devices.half_dtype), the precision the 2:4 sparse kernels need; None always keeps
        the stored dtype.
    backend: SlopeConfig.backend for the sparse layers; "auto" picks the best one for the device.
    inference: freeze every parameter (`slope.convert.for_inference`), so that on a 2:4 GPU backend each
        sparse layer stores its values once, inside its compressed operand; for serving and evaluation.
    """
    device = resolve_device(device)
    source = resolve_model_dir(path)
    if source.kind == "export":
        model = load_compressed(source.path, backend=backend)
    elif source.kind == "checkpoint":
        model, _, _ = checkpoint.load_checkpoint(source.path)
        for _, layer in slope_layers(model):
            layer.set_backend(backend)
    else:
        model = _load_huggingface(source.path)
        for _, layer in slope_layers(model):  # a sparsified model's save_pretrained, or a serving export
            layer.set_backend(backend)
    target = _inference_dtype(dtype, next(model.parameters()).dtype, device)
    model = model.to(device=device, dtype=target).eval()
    if inference:
        return for_inference(model)
    if slope_layers(model):
        guard_lora_targets(model)  # a loaded sparse model is a PEFT target like a sparsified one
    return model


def _load_huggingface(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    marker = slope_marker(path)
    refuse_pickle_only(path)
    try:
        if marker is not None and marker["format"] == HF_CONFIG_FORMAT:
            model = _load_sparse_state_dict(path, marker)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True)
        if marker is not None and marker["format"] == SERVE_FORMAT:  # back to SlopeLinear + adapters
            rebuild_serving(model, path, marker)
    except FormatError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise FormatError(f"{path}: cannot load this Hugging Face model directory ({one_line(err)})") from err
    check_model_masks(model, path)
    return model


def refuse_pickle_only(path: Path) -> None:
    """FormatError for a Hugging Face folder whose weights are pickled only: slope never unpickles."""
    pickled = [name for name in PICKLE_WEIGHTS_FILES if (path / name).is_file()]
    if pickled and not any(path.glob("*.safetensors")):
        raise FormatError(f"{path} holds only {pickled[0]} (pickle); slope reads safetensors only: convert it with "
                          "transformers' save_pretrained(safe_serialization=True)")


def slope_marker(path: Path) -> dict | None:
    """config.json's `slope` entry when `model.save_pretrained` wrote a sparsified model or `slope export --serve`
    wrote the folder, else None."""
    config = read_json(path / HF_CONFIG_FILE, "the model config")
    marker = config.get(HF_CONFIG_KEY) if isinstance(config, dict) else None
    if isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT_NAME:
        # the config.json of a compressed export whose metadata is gone: transformers would load it with
        # random sparse weights, so refuse
        raise FormatError(f"{path / META_FILE} is missing: {path} is an incomplete slope export")
    if not isinstance(marker, dict) or marker.get("format") not in (HF_CONFIG_FORMAT, SERVE_FORMAT):
        return None
    if not isinstance(marker.get("format_version"), int) or marker["format_version"] > 1:
        raise FormatError(
            f"{path / HF_CONFIG_FILE}: {HF_CONFIG_KEY}.format_version {marker.get('format_version')!r} is not one "
            "this slope reads (1); upgrade slope to load it"
        )
    return marker


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder: model.safetensors, or the shards its index lists."""
    index = path / (WEIGHTS_FILE + ".index.json")
    if index.is_file():
        weight_map = read_json(index, "the weights index")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise FormatError(f"{index}: expected an object with a 'weight_map' object")
        files = [confined(path, shard, str(index)) for shard in sorted(set(map(str, weight_map.values())))]
    else:
        files = [path / WEIGHTS_FILE]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise FormatError(f"{file} is missing")
        state.update(load_file(file))
    return state


def _load_sparse_state_dict(path: Path, marker: dict) -> nn.Module:
    """The model `save_pretrained` wrote from a sparsified model: its state_dict as it was, bit for bit.

    Which layers are SlopeLinear is read from the weights (a `L.row_bits` tensor), their adapter rank
    from their entries (`SlopeLinear.saved_rank`); the scale is derived from the stored
    SlopeConfig as training derived it (as for training checkpoints).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    state = _read_state(path)
    cfg = SlopeConfig(**marker["slope_config"])
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)  # as saved, not the default
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = _under_model_names(model, state)
    check_state_masks(state.get, state, cfg.n, cfg.m, cfg.double_prune, path)  # as saved, before loading
    for key in [k for k in state if k.endswith(".row_bits")]:
        name = key.removesuffix(".row_bits")
        try:
            module = model.get_submodule(name)
            weight, source = dense_weight_of(module)
        except (AttributeError, TypeError) as err:
            raise FormatError(f"{path / WEIGHTS_FILE}: {name} is not a linear layer of the configured model") from err
        layer = SlopeLinear.empty(weight.shape[1], weight.shape[0], module.bias, cfg, source=source,
                                  device=weight.device, dtype=weight.dtype)
        rank = SlopeLinear.saved_rank(state.get, f"{name}.")
        if rank:
            layer.add_adapter(rank)
        replace_module(model, name, layer)
    # save_pretrained stores a tied tensor (GPT-2's lm_head / wte) once: a missing key is fine when the
    # model ties it to a loaded one
    expected = model.state_dict(keep_vars=True)
    loaded_ids = {id(expected[k]) for k in state if k in expected}
    missing = [k for k in expected if k not in state and id(expected[k]) not in loaded_ids]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise FormatError(
            f"{path / WEIGHTS_FILE} does not fit {HF_CONFIG_FILE}: "
            + "; ".join(f"{what} {', '.join(keys[:3])}" for what, keys in (("missing", missing),
                                                                            ("unexpected", unexpected)) if keys)
        )
    model.load_state_dict(state, strict=False)
    model.slope_report = SparsifyReport(
        config=cfg, converted=[name for name, _ in slope_layers(model)],
        params_after=sum(p.numel() for p in model.parameters()),
        params_before=dense_equivalent_params(model), first_linear_method="as recorded in the weights",
    )
    return model.eval()


def _under_model_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` keyed as `model.state_dict()` names its entries.

    transformers 5 saves some families under their historical checkpoint names (GPT-NeoX's head
    `lm_head` as `embed_out`) and renames them back when it loads; a sparsified model's weights are read
    here rather than by transformers, so the same renaming is applied here, from transformers' own table.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4 saves every key under the model's own name
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    renamed = {}
    for key, tensor in state.items():
        for renaming in renamings:
            key, _ = renaming.rename_source_key(key)
        renamed[key] = tensor
    return renamed


def _inference_dtype(dtype, stored: torch.dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return stored
    if dtype != "auto":
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be a torch.dtype, 'auto' or None, got {dtype!r}")
        return dtype
    if device.type == "cuda" and stored == torch.float32:
        return half_dtype(device)
    return stored


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a model directory of any kind `load` accepts."""
    from transformers import AutoTokenizer

    source = resolve_model_dir(path)
    folder = source.path if source.kind == "huggingface" else source.path / TOKENIZER_DIR
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    raise FileNotFoundError(f"{path} has no saved tokenizer (looked in {folder})")


# ---- the compressed format -------------------------------------------------------------------


def read_metadata(path: str | Path) -> dict:
    """slope_model.json, believed only once it passes its own checksum (`slope.io.format.check_sealed`),
    then checked for format name and version. Without a checksum it is read only to refuse it: slope
    0.1's version 1 (which had none) as unsupported, a newer version with "upgrade slope"."""
    file = Path(path) / META_FILE
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise FormatError(f"{file}: cannot read the export metadata ({one_line(err)})") from err
    meta = parse_json(raw, file, "the export metadata")
    if isinstance(meta, dict) and META_CHECKSUM_KEY in meta:
        check_sealed(file, raw, meta, META_CHECKSUM_KEY)  # before any field of it is believed
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT_NAME:
        raise FormatError(f"{file}: not a slope export (format is {meta.get('format') if isinstance(meta, dict) else meta!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{file}: invalid format_version {version!r}")
    if version > EXPORT_FORMAT_VERSION:
        raise FormatError(
            f"{file}: format version {version} is newer than this slope reads (up to {EXPORT_FORMAT_VERSION}); "
            "upgrade slope to load it"
        )
    if version < EXPORT_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{file} has format version {version}, which this version of slope does not read (it reads version "
            f"{EXPORT_FORMAT_VERSION} only; version 1 was written by slope 0.1)"
        )
    if META_CHECKSUM_KEY not in meta:
        raise FormatError(f"{file} has no {META_CHECKSUM_KEY}, the checksum of the file itself: written by an "
                          "earlier slope, or edited; export the model again")
    for key in ("n", "m", "layers", "tied", "model_config", "files", "dtype"):
        if key not in meta:
            raise FormatError(f"{file}: missing field {key!r}")
    return meta


def verify_files(path: str | Path, meta: dict) -> None:
    """The metadata lists every other file of `path`, each inside it with its size and SHA-256 (truncation,
    corruption, an edit, a file added or its entry removed)."""
    path = Path(path)
    if not isinstance(meta["files"], dict) or EXPORT_WEIGHTS_FILE not in meta["files"]:
        raise FormatError(f"{path / META_FILE}: {EXPORT_WEIGHTS_FILE} is not listed under files")
    check_digests(path, meta["files"], path / META_FILE)


def load_compressed(path: str | Path, dtype: torch.dtype | None = None, backend: str = "auto") -> nn.Module:
    """Build the model of a compressed export on the CPU; raises FormatError on any inconsistency."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        verify_files(path, meta)
        model = _build(path, meta, dtype, backend)
        check_model_masks(model, path / EXPORT_WEIGHTS_FILE)
        return model
    except FormatError as err:  # each line names the export: a layer's line names only the layer
        if str(path) in str(err):
            raise
        raise FormatError(f"{path / META_FILE}: {err}") from err
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError, OverflowError,
            SafetensorError) as err:
        # malformed metadata fields (10**400 where a float belongs), an invalid slope_config, or a state_dict the
        # model rejects
        raise FormatError(f"{path}: inconsistent export ({one_line(err)})") from err


def _build(path: Path, meta: dict, dtype: torch.dtype | None, backend: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    weights_file = path / EXPORT_WEIGHTS_FILE
    tensors = load_file(weights_file)

    stored_dtype = DTYPES.get(meta["dtype"])
    if stored_dtype is None:
        raise FormatError(f"{path / META_FILE}: unknown dtype {meta['dtype']!r} (expected one of {', '.join(DTYPES)})")
    try:
        config = AutoConfig.for_model(**meta["model_config"])
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or stored_dtype)
    except Exception as err:  # transformers raises what a bad config makes it meet (its own validation errors, ...)
        raise FormatError(f"{path / META_FILE}: invalid model_config ({one_line(err)})") from err

    slope_cfg = SlopeConfig(**meta["slope_config"]).replace(backend=backend) if meta["layers"] else None
    state = _swap_in_layers(model, meta, slope_cfg, path)
    expected = model.state_dict()
    _check_keys(meta, expected, tensors, weights_file)

    for name, spec in meta["layers"].items():
        out_f, in_f = spec["shape"]
        n, m = slope_cfg.n, slope_cfg.m
        values = tensors[f"{name}.values"]
        if tuple(values.shape) != (out_f, in_f * n // m):
            raise FormatError(
                f"{name}.values has shape {tuple(values.shape)}, expected {(out_f, in_f * n // m)} for a "
                f"{n}:{m} layer of shape (out={out_f}, in={in_f})"
            )
        try:
            row_bits = unpack_positions(tensors[f"{name}.positions"], (out_f, in_f // m), n, m)
        except ValueError as err:
            raise FormatError(f"{name}.positions: {err}") from err
        state[f"{name}.weight"] = values
        state[f"{name}.row_bits"] = row_bits
        for part in ("bias", "adapter_a", "adapter_b"):
            if f"{name}.{part}" in tensors:
                state[f"{name}.{part}"] = tensors[f"{name}.{part}"]
    for key in expected:
        if key in state:
            continue
        state[key] = tensors[meta["tied"].get(key, key)]
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FormatError(
                f"{key} has shape {tuple(value.shape)} in {weights_file}, but the model config gives "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)
    if slope_cfg is not None:
        model.slope_report = _report(model, meta, slope_cfg)  # so a re-export keeps the skip list
    return model


def _report(model: nn.Module, meta: dict, cfg: SlopeConfig) -> SparsifyReport:
    # As `sparsify` reported it: counted before adapters were added.
    adapters = sum(layer.adapter_a.numel() + layer.adapter_b.numel() for _, layer in slope_layers(model) if layer.rank)
    return SparsifyReport(
        config=cfg, converted=list(meta["layers"]), skipped=dict(meta.get("skipped", {})),
        params_before=dense_equivalent_params(model) - adapters,
        params_after=sum(p.numel() for p in model.parameters()) - adapters,
        first_linear_method="as recorded in the export",
    )


def _swap_in_layers(model: nn.Module, meta: dict, cfg: SlopeConfig | None, path: Path) -> dict:
    """Replace the recorded layers by SlopeLinear (with adapters); returns their fixed state entries."""
    if cfg is not None and (meta["n"], meta["m"]) != (cfg.n, cfg.m):
        raise FormatError(f"{path / META_FILE}: n:m {meta['n']}:{meta['m']} differs from slope_config {cfg.n}:{cfg.m}")
    if cfg is not None and meta.get("position_bits") != code_bits(cfg.n, cfg.m):
        raise FormatError(f"{path / META_FILE}: position_bits {meta.get('position_bits')} do not match {cfg.n}:{cfg.m}")
    state: dict[str, torch.Tensor] = {}
    for name, spec in meta["layers"].items():
        try:
            module = model.get_submodule(name)
            weight, source = dense_weight_of(module)
        except (AttributeError, TypeError) as err:
            raise FormatError(f"layer {name} of the export is not a linear layer of the configured model ({err})") from err
        if list(weight.shape) != list(spec["shape"]) or source != spec["source"]:
            raise FormatError(
                f"layer {name} is stored as a {spec['source']} of shape (out, in) = {tuple(spec['shape'])}, but the "
                f"model config builds a {source} of shape {tuple(weight.shape)}"
            )
        if (module.bias is not None) != spec["bias"]:
            raise FormatError(f"layer {name}: bias={spec['bias']} in the export, but not in the model config")
        # no mask is computed here: the stored values and positions are loaded right after
        layer = SlopeLinear.empty(
            weight.shape[1], weight.shape[0], module.bias, cfg, source=source, device=weight.device, dtype=weight.dtype,
        )
        rank, scale = spec["adapter_rank"], spec["adapter_scale"]
        if rank is not None and rank != 0:  # 0 or null: no adapters
            if type(rank) is not int or rank < 0 or type(scale) not in (int, float) or not 0 < scale < 2**63:
                raise FormatError(f"layer {name}: adapter_rank must be an integer >= 0 and adapter_scale a number "
                                  f"in (0, 2**63), got {reprlib.repr(rank)} and {reprlib.repr(scale)}")
            layer.add_adapter(rank, scale=float(scale))
        replace_module(model, name, layer)
        # Not stored: M_C is a training cache, rebuilt on the first training step.
        state.update(layer.initial_training_state(f"{name}."))
    return state


def _check_keys(meta: dict, expected: dict, tensors: dict, weights_file: Path) -> None:
    """The weights file holds exactly the tensors this model needs, none missing, none extra."""
    needed = set()
    layer_parts = {"weight", "row_bits", "col_bits", "mask_state", "bias", "adapter_a", "adapter_b"}
    for key in expected:
        prefix, _, leaf = key.rpartition(".")
        if prefix in meta["layers"] and leaf in layer_parts:
            if leaf in ("bias", "adapter_a", "adapter_b"):
                needed.add(key)
            elif leaf == "weight":
                needed |= {f"{prefix}.values", f"{prefix}.positions"}
        elif key in meta["tied"]:
            if meta["tied"][key] not in expected:
                raise FormatError(f"{weights_file.parent / META_FILE}: {key} is tied to unknown tensor {meta['tied'][key]}")
        else:
            needed.add(key)
    have = set(tensors)
    missing, extra = sorted(needed - have), sorted(have - needed)
    if missing or extra:
        raise FormatError(
            f"{weights_file} does not match the model config: "
            + "; ".join(
                f"{what} {len(keys)} tensor(s) (e.g. {', '.join(keys[:3])})"
                for what, keys in (("missing", missing), ("unexpected", extra)) if keys
            )
        )
