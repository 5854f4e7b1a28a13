"""Writing a trained model out: the compressed SLoPe format, or a plain dense Hugging Face model.

Compressed format (version 2; full description in docs/export.md; names and version in
slope.io.format), one directory:

    config.json         the transformers config (model_type, ...) plus `slope`: {format, format_version,
                        metadata: "slope_model.json"}; tokenizer files next to it (as in tokenizer/)
    slope_model.safetensors  (model.safetensors in version 1) per SlopeLinear `L`: L.values (out, in·n/m) kept values, L.positions uint8
                        bit-packed pattern codes (slope.io.packing), L.bias, L.adapter_a (in, r),
                        L.adapter_b (r, out); every other tensor of the state_dict under its own name,
                        tied weights stored once
    tokenizer/          PreTrainedTokenizer.save_pretrained output (optional)
    README.md           the model card
    slope_model.json    format name and version, N:M, layers, skip list, model config, the size and
                        SHA-256 of every other file, and last `metadata_sha256`: its own checksum

slope_model.json is written last, so an interrupted export is never mistaken for a complete one. A reader
refuses an export whose slope_model.json fails its own checksum, or whose folder holds a file that is
missing, altered or not listed (slope.io.format.check_sealed, check_digests).
`export` converts anything `slope.io.load.load` reads (run, checkpoint, export) into either form.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slope.convert import HF_CONFIG_KEY, densify, slope_layers
from slope.io.format import (
    EXPORT_FORMAT_NAME,
    EXPORT_FORMAT_VERSION,
    EXPORT_WEIGHTS_FILE,
    HF_CONFIG_FILE,
    META_CHECKSUM_KEY,
    META_FILE,
    TOKENIZER_DIR,
    check_dtype_arg,
    check_export_args,
    dtype_name,
    file_digests,
    sealed_json,
)
from slope.io.load import load, load_tokenizer
from slope.io.model_card import write_model_card
from slope.io.packing import code_bits, pack_positions, uses_combinations
from slope.io.tokenizers import for_export


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().cpu()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def _common_nm(layers: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    patterns = {(layer.config.n, layer.config.m) for _, layer in layers}
    if len(patterns) > 1:
        raise ValueError(f"export needs one N:M pattern for the whole model, found {sorted(patterns)}")
    return patterns.pop() if patterns else (0, 0)


def save_compressed(
    model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None
) -> Path:
    """Write `model` (a sparsified transformers model) in the compressed format; returns the directory.

    dtype: cast floating tensors (values, adapters, dense weights) to it; None keeps the model's.
    """
    check_export_args("save_compressed", model, tokenizer, dtype)
    stored_dtype = dtype_name(dtype or next(model.parameters()).dtype)  # before anything is written
    layers = slope_layers(model)
    n, m = _common_nm(layers)
    out = _prepare_out_dir(out_dir)
    tensors, layer_meta = _compressed_layers(layers, n, m, dtype)
    tied = _add_other_tensors(model, layer_meta, tensors, dtype)
    save_file(
        tensors, out / EXPORT_WEIGHTS_FILE,
        metadata={"format": EXPORT_FORMAT_NAME, "format_version": str(EXPORT_FORMAT_VERSION)},
    )
    if tokenizer is not None:
        tokenizer = for_export(tokenizer, model)
        tokenizer.save_pretrained(out / TOKENIZER_DIR)
        tokenizer.save_pretrained(out)  # also at the top, where AutoTokenizer (and lm-eval's HFLM) look
    model_config = model.config.to_dict()
    if dtype is not None:
        model_config["dtype"] = stored_dtype
    _write_top_config(out, model_config)
    report = getattr(model, "slope_report", None)
    write_model_card(out, model, "compressed")  # before the checksums, which cover every file
    meta = {
        "format": EXPORT_FORMAT_NAME,
        "format_version": EXPORT_FORMAT_VERSION,
        "n": n,
        "m": m,
        "position_code": ("combinations" if uses_combinations(n, m) else "bitmask") if layers else None,
        "position_bits": code_bits(n, m) if layers else None,
        "dtype": stored_dtype,
        # the backend is chosen where the model is loaded (slope.load's `backend`), not stored
        "slope_config": layers[0][1].config.replace(backend="auto").to_dict() if layers else None,
        "layers": layer_meta,
        "skipped": dict(report.skipped) if report is not None else {},
        "tied": tied,
        "model_config": model_config,
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        "files": file_digests(out),  # every file written so far: all but this one
    }
    _write_meta_last(out, meta)
    return out


def _compressed_layers(
    layers: list[tuple[str, nn.Module]], n: int, m: int, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors, metadata by layer name) of the SlopeLinear layers: kept values, packed positions, adapters."""
    tensors: dict[str, torch.Tensor] = {}
    layer_meta: dict[str, dict] = {}
    for name, layer in layers:
        tensors[f"{name}.values"] = _cast(layer.weight, dtype)  # (out, in·n/m)
        tensors[f"{name}.positions"] = pack_positions(layer.row_bits, n, m)  # (ceil(groups·b/8),) uint8
        if layer.bias is not None:
            tensors[f"{name}.bias"] = _cast(layer.bias, dtype)
        if layer.rank:
            tensors[f"{name}.adapter_a"] = _cast(layer.adapter_a, dtype)  # (in, r)
            tensors[f"{name}.adapter_b"] = _cast(layer.adapter_b, dtype)  # (r, out)
        layer_meta[name] = {
            "shape": [layer.out_features, layer.in_features],
            "source": layer.source,
            "bias": layer.bias is not None,
            "adapter_rank": layer.rank,
            "adapter_scale": layer.adapter_scale if layer.rank else None,
        }
    return tensors, layer_meta


def _add_other_tensors(
    model: nn.Module, layer_meta: dict[str, dict], tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, str]:
    """Add to `tensors` everything outside the SlopeLinear layers, by state_dict name; returns `tied`.

    A tied tensor (GPT-2's lm_head and wte) appears under several names but is stored once; `tied`
    maps each other name to the one it is stored under.
    """
    stored_by_id: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.rsplit(".", 1)[0] in layer_meta:  # stored in compressed form by _compressed_layers
            continue
        if id(value) in stored_by_id:
            tied[key] = stored_by_id[id(value)]
            continue
        stored_by_id[id(value)] = key
        tensors[key] = _cast(value, dtype)
    return tied


def _write_top_config(out: Path, model_config: dict) -> None:
    """config.json at the top, its `slope` entry pointing at slope_model.json.

    transformers' AutoConfig (model_type) reads it, so tools that inspect a model folder see what it is.
    The weights are not in a layout transformers reads, and their file name is not one it looks for, so
    from_pretrained refuses the folder ("no file named model.safetensors"): load with slope.load, or
    export with --dense / --serve for transformers and vLLM.
    """
    top_config = {k: v for k, v in model_config.items() if k != HF_CONFIG_KEY}
    top_config[HF_CONFIG_KEY] = {"format": EXPORT_FORMAT_NAME, "format_version": EXPORT_FORMAT_VERSION,
                                 "metadata": META_FILE}
    (out / HF_CONFIG_FILE).write_text(json.dumps(top_config, indent=2, sort_keys=True) + "\n")


def _write_meta_last(out: Path, meta: dict) -> None:
    """slope_model.json, its own checksum last, renamed into place: the export is complete once its
    metadata is there."""
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(sealed_json(meta, META_CHECKSUM_KEY))
    os.replace(tmp, out / META_FILE)


def save_dense(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """A plain Hugging Face model directory (W_R with adapters merged) that loads without slope.

    `model` itself is left untouched: a copy is densified.
    """
    check_export_args("save_dense", model, tokenizer, dtype)
    out = _prepare_out_dir(out_dir)
    dense = copy.deepcopy(model)
    if slope_layers(dense):
        densify(dense)
    if dtype is not None:
        dense.to(dtype)
    dense.save_pretrained(out)
    if tokenizer is not None:
        for_export(tokenizer, model).save_pretrained(out)
    write_model_card(out, dense, "dense", source_layers=slope_layers(model))
    return out


def export(
    source: str | Path, out_dir: str | Path, dense: bool = False, dtype: torch.dtype | None = None,
    serve: bool = False,
) -> Path:
    """Export a training run/checkpoint (or a compressed export) to `out_dir`; returns it.

    dense: a plain transformers model, adapters merged. serve: the serving export (slope.io.serve: a
    transformers base keeping its N:M zeros plus the adapters as a PEFT LoRA folder).
    """
    if dense and serve:
        raise ValueError("choose one of dense and serve")
    check_dtype_arg("export", dtype)
    model = load(source, device="cpu", backend="reference")
    tokenizer = load_tokenizer(source)
    if serve:
        from slope.io.serve import save_serving

        return save_serving(model, out_dir, tokenizer, dtype)
    if dense:
        return save_dense(model, out_dir, tokenizer, dtype)
    return save_compressed(model, out_dir, tokenizer, dtype)
