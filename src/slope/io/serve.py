"""The serving export: a plain transformers base whose sparse layers keep their N:M zeros, plus the adapters
as a separate PEFT LoRA folder (vLLM `--enable-lora`, lm-eval `peft=`, `PeftModel.from_pretrained`).

    OUT/config.json, model.safetensors, tokenizer files   the base: W_R of every SlopeLinear as a dense
                                                          weight (exactly n of every m nonzero), adapters
                                                          NOT merged; `slope` in config.json (below)
    OUT/adapter/adapter_config.json, adapter_model.safetensors   the SLoPe adapters (slope.io.peft)

Why dense storage: compressed-tensors' sparse 2:4 formats (sparse-24-bitmask) are gone from the package
since 0.15 (no compressor is registered for them; its ModelCompressor refuses Sparse24 configs) and vLLM
dropped Sparse24 checkpoints (they raise NotImplementedError), so a 2:4-compressed checkpoint would not load
in the current versions of either. The base written here loads everywhere; the 2:4 structure stays in the
values, and config.json's `slope.sparsity_config` records it with compressed-tensors' own
`DenseSparsityConfig` (format "dense": stored uncompressed; structure "2:4") for tools that re-compress it. It is kept out
of `quantization_config` on purpose: there, current vLLM would refuse the model. `slope.load` of the folder
rebuilds the SLoPe model (`rebuild_serving`, from `slope.slope_config`, `sparse_layers` and the adapter folder).

The folder has no checksums (unlike a checkpoint or a compressed export): it is a plain Hugging Face
folder, read by tools that know nothing of slope. `slope check` checks its structure (exactly n:m).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from slope.config import SlopeConfig
from slope.convert import HF_CONFIG_KEY, densify, replace_module, slope_layers
from slope.io.format import HF_CONFIG_FILE, SERVE_FORMAT, FormatError, check_export_args, confined, read_json
from slope.io.model_card import write_model_card
from slope.io.peft import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    PEFT_PREFIX,
    save_peft_adapter,
    strip_adapters,
)
from slope.io.tokenizers import for_export
from slope.linear import SlopeLinear

ADAPTER_DIR = "adapter"


def sparsity_config(layers: list, total_params: int) -> dict | None:
    """compressed-tensors' description of the sparse `layers` ((name, SlopeLinear) pairs): its `DenseSparsityConfig` ("stored uncompressed")
    with the N:M structure and the targets; None without the package (`pip install 'slope[serve]'`)."""
    try:
        from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
    except ImportError:
        return None
    n, m = layers[0][1].config.n, layers[0][1].config.m
    pruned = sum(layer.in_features * layer.out_features * (m - n) // m for _, layer in layers)
    config = SparsityCompressionConfig.load_from_registry(
        # global_sparsity: the share of the base's weights (dense count, no adapters) that are pruned zeros
        CompressionFormat.dense.value, targets=[name for name, _ in layers], global_sparsity=pruned / total_params,
        sparsity_structure=f"{n}:{m}",
    )
    return config.model_dump(exclude={"registry_requires_subclass"})


def save_serving(model: nn.Module, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write the serving export of `model` (a sparsified transformers model) to `out_dir`; returns it.

    `model` itself is left untouched. dtype: cast the floating tensors (base and adapter) to it.
    """
    check_export_args("save_serving", model, tokenizer, dtype)
    layers = slope_layers(model)
    if not layers:
        raise ValueError("a serving export needs a sparse (SLoPe) model; for a dense one use --dense")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory; choose a new --out")
    work = copy.deepcopy(model)
    if dtype is not None:
        work.to(dtype)
    has_adapters = any(layer.rank for _, layer in layers)
    if has_adapters:
        save_peft_adapter(work, out / ADAPTER_DIR)
    base = densify(strip_adapters(work))  # (out, in) W_R per sparse layer: its zeros stay exact zeros
    setattr(base.config, HF_CONFIG_KEY, {
        "format": SERVE_FORMAT, "format_version": 1,
        "n": layers[0][1].config.n, "m": layers[0][1].config.m,
        # with the SlopeConfig, slope.load rebuilds the SlopeLinear layers (and adapters) from this folder
        "slope_config": layers[0][1].config.replace(backend="auto").to_dict(),
        "sparse_layers": [name for name, _ in layers],
        "adapter": ADAPTER_DIR if has_adapters else None,
        "sparsity_config": sparsity_config(layers, sum(p.numel() for p in base.parameters())),
    })
    base.save_pretrained(out)
    if tokenizer is not None:
        for_export(tokenizer, model).save_pretrained(out)
    write_model_card(out, model, "serving")
    return out


def rebuild_serving(model: nn.Module, path: Path, marker: dict) -> None:
    """The model of a serving export (`slope.load` of it), in place: its sparse layers as SlopeLinear, its PEFT adapter as SLoPe adapters.

    Each sparse weight keeps exactly n of every m nonzero, so the magnitude mask `from_dense` computes is the
    stored one and the kept values are the stored ones. The adapter folder holds lora_A = Aᵀ, lora_B = Bᵀ and
    scaling α/r = s (slope.io.peft); A, B and s come back from it.
    """
    cfg = SlopeConfig(**marker["slope_config"])
    for name in marker["sparse_layers"]:
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise FormatError(f"{path / HF_CONFIG_FILE}: sparse layer {name} is not in the model") from err
        replace_module(model, name, SlopeLinear.from_dense(module, cfg))
    if not marker.get("adapter"):
        return
    folder = confined(path, marker["adapter"], str(path / HF_CONFIG_FILE))
    config = read_json(folder / ADAPTER_CONFIG_FILE, "the adapter config")
    weights = load_file(folder / ADAPTER_WEIGHTS_FILE)
    for name in config["target_modules"]:
        layer = model.get_submodule(name)
        if not isinstance(layer, SlopeLinear):
            raise FormatError(f"{folder}: the adapter targets {name}, which is not a sparse layer of this export")
        a = weights[f"{PEFT_PREFIX}{name}.lora_A.weight"]  # (r, in)
        b = weights[f"{PEFT_PREFIX}{name}.lora_B.weight"]  # (out, r)
        rank = config.get("rank_pattern", {}).get(name, config["r"])
        alpha = config.get("alpha_pattern", {}).get(name, config["lora_alpha"])
        if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, int | float):
            raise FormatError(f"{folder}: {name} has adapter rank {rank!r} and alpha {alpha!r}: expected an integer "
                              ">= 1 and a number")
        if tuple(a.shape) != (rank, layer.in_features) or tuple(b.shape) != (layer.out_features, rank):
            raise FormatError(f"{folder}: {name} has adapter shapes {tuple(a.shape)}, {tuple(b.shape)}, expected rank {rank}")
        layer.add_adapter(rank, scale=alpha / rank)
        with torch.no_grad():
            layer.adapter_a.copy_(a.t())
            layer.adapter_b.copy_(b.t())
