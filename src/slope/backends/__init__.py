"""Sparse products behind one door: what SlopeLinear and the rest of slope use from the backends.

Modules, each owning one job:
    weights           StepWeights (W_R of a step, built on demand) and ColumnMask (M_C of a step)
    reference         the dense masked products: the CPU path and the test oracle
    sparselib         2:4 libraries (cuSPARSELt, CUTLASS, emulated) behind one SparseLib interface
    semistructured    the 2:4 backend over a SparseLib, and the compressed operands a layer keeps
    numerics          tolerances, the layout check and the numerics check
    timing            the back-to-back timer of set-up measurements
    select            backend choice, kernel tuning and the set-up cache
    fused             adapter inference with one sparse product
    runtime           LayerRuntime: one SlopeLinear's backends, operands and inference
    cusparselt_plans  cached cuSPARSELt plans through its C API (imported on the first cuSPARSELt product)
    cusparselt_library  opening libcusparseLt and binding its C functions (imported with the plans)
"""

from slope.backends.runtime import LayerRuntime, backend_summary
from slope.backends.select import availability, select_backend
from slope.backends.sparselib import CUSPARSELT
from slope.backends.weights import ColumnMask


def cusparselt_plans_status() -> str:
    """One line for `slope info`: whether cached cuSPARSELt plans are used and, if not, why."""
    return CUSPARSELT.plans_status()


__all__ = [
    "ColumnMask",
    "LayerRuntime",
    "availability",
    "backend_summary",
    "cusparselt_plans_status",
    "select_backend",
]
