"""slope: sparse pretraining of language models with SLoPe (double-pruned N:M + lazy low-rank adapters)."""

from slope.config import SlopeConfig
from slope.convert import SparsifyReport, add_adapters, densify, slope_layers, sparsify
from slope.io.export import save_compressed, save_dense
from slope.io.load import FormatError, load, load_tokenizer
from slope.linear import SlopeLinear
from slope.masks import column_mask, double_prune, nm_mask

__version__ = "0.1.0"

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
    "load",
    "load_tokenizer",
    "nm_mask",
    "save_compressed",
    "save_dense",
    "slope_layers",
    "sparsify",
]
