"""slope: sparse pretraining of language models with SLoPe (double-pruned N:M + lazy low-rank adapters).

The public API is listed in `__all__`. Each name is imported from its module on first use, so
`import slope` (and the `slope` command's help) does not pay for importing torch until a name is
needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# public name -> the module that owns it
_OWNERS = {
    "SlopeConfig": "slope.config",
    "SlopeLinear": "slope.linear",
    "track_steps": "slope.linear",
    "SparsifyReport": "slope.convert",
    "add_adapters": "slope.convert",
    "densify": "slope.convert",
    "for_inference": "slope.convert",
    "estimate_memory": "slope.train.memory_estimate",
    "slope_layers": "slope.convert",
    "sparsify": "slope.convert",
    "column_mask": "slope.masks",
    "double_prune": "slope.masks",
    "nm_mask": "slope.masks",
    "FormatError": "slope.io.format",
    "load": "slope.io.load",
    "load_tokenizer": "slope.io.load",
    "save_compressed": "slope.io.export",
    "save_dense": "slope.io.export",
    "save_serving": "slope.io.serve",
    "get_peft_model": "slope.io.peft",
    "save_peft_adapter": "slope.io.peft",
    "strip_adapters": "slope.io.peft",
}

__all__ = [
    "FormatError",
    "SlopeConfig",
    "SlopeLinear",
    "SparsifyReport",
    "__version__",
    "add_adapters",
    "column_mask",
    "densify",
    "double_prune",
    "estimate_memory",
    "for_inference",
    "get_peft_model",
    "load",
    "load_tokenizer",
    "nm_mask",
    "save_compressed",
    "save_dense",
    "save_peft_adapter",
    "save_serving",
    "slope_layers",
    "sparsify",
    "strip_adapters",
    "track_steps",
]


def __getattr__(name: str):
    owner = _OWNERS.get(name)
    if owner is None:
        raise AttributeError(f"module 'slope' has no attribute {name!r}")
    value = getattr(importlib.import_module(owner), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_OWNERS))


if TYPE_CHECKING:  # what static tools see: the same names, imported eagerly
    from slope.config import SlopeConfig
    from slope.convert import SparsifyReport, add_adapters, densify, for_inference, slope_layers, sparsify
    from slope.io.export import save_compressed, save_dense
    from slope.io.format import FormatError
    from slope.io.load import load, load_tokenizer
    from slope.io.peft import get_peft_model, save_peft_adapter, strip_adapters
    from slope.io.serve import save_serving
    from slope.linear import SlopeLinear, track_steps
    from slope.masks import column_mask, double_prune, nm_mask
    from slope.train.memory_estimate import estimate_memory
