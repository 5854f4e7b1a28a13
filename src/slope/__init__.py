"""slope: sparse pretraining of language models with SLoPe (double-pruned N:M + lazy low-rank adapters)."""

from slope.config import SlopeConfig
from slope.convert import SparsifyReport, add_adapters, densify, slope_layers, sparsify
from slope.linear import SlopeLinear
from slope.masks import column_mask, double_prune, nm_mask

__version__ = "0.1.0"

__all__ = [
    "SlopeConfig",
    "SlopeLinear",
    "SparsifyReport",
    "__version__",
    "add_adapters",
    "column_mask",
    "densify",
    "double_prune",
    "nm_mask",
    "slope_layers",
    "sparsify",
]
