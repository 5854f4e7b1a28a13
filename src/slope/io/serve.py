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
rebuilds the SLoPe model (slope.io.load reads `slope.slope_config`, `sparse_layers` and the adapter folder).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from slope.convert import HF_CONFIG_KEY, densify, slope_layers
from slope.io.format import SERVE_FORMAT
from slope.io.model_card import write_model_card
from slope.io.peft import save_peft_adapter, strip_adapters
from slope.io.tokenizers import for_export

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
