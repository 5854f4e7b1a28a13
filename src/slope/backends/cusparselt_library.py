"""Opening the cuSPARSELt shared library and binding its C API through ctypes (nothing to compile).

Which file is opened (the copy torch loaded first, then where pip wheels put it), the argument types
of every function `cusparselt_plans` calls, and the aligned memory blocks its opaque structs live in.
Imported only by `cusparselt_plans`, so only by the first cuSPARSELt product.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import site
import sys
from pathlib import Path

# Opaque structs are 512 bytes, 16-byte aligned, in 0.8's header; twice that is allocated so an
# older or newer layout of the same API can never write past the buffer.
OPAQUE_BYTES = 1024

# Where pip wheels put libcusparseLt under site-packages: nvidia-cusparselt-cu12 in nvidia/cusparselt/lib;
# the newer per-CUDA-major wheels (torch +cu130 pulls nvidia-cusparselt-cu13) in nvidia/cu13/lib or
# nvidia/cu12/lib; some torch builds bundle it in torch/lib.
WHEEL_LIB_DIRS = ("nvidia/cusparselt/lib", "nvidia/cu13/lib", "nvidia/cu12/lib", "torch/lib")


class OpaqueStruct:
    """A zeroed, 16-byte aligned block for one cuSPARSELt opaque struct; `.ptr` is its address."""

    def __init__(self):
        self._buf = ctypes.create_string_buffer(OPAQUE_BYTES + 16)
        base = ctypes.addressof(self._buf)
        self.ptr = ctypes.c_void_p(base + (-base) % 16)


_SIGNATURES = {
    # name: argument types (every function returns a cusparseStatus_t)
    "cusparseLtInit": [ctypes.c_void_p],
    "cusparseLtGetVersion": [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)],
    "cusparseLtDenseDescriptorInit": [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
        ctypes.c_int, ctypes.c_int,
    ],
    "cusparseLtStructuredDescriptorInit": [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
        ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ],
    "cusparseLtMatDescriptorDestroy": [ctypes.c_void_p],
    "cusparseLtMatmulDescriptorInit": [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
    ],
    "cusparseLtMatmulAlgSelectionInit": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int],
    "cusparseLtMatmulAlgSetAttribute": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t],
    "cusparseLtMatmulAlgGetAttribute": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t],
    "cusparseLtMatmulAlgSelectionDestroy": [ctypes.c_void_p],
    "cusparseLtMatmulPlanInit": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
    "cusparseLtMatmulGetWorkspace": [ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)],
    "cusparseLtMatmulPlanDestroy": [ctypes.c_void_p],
    "cusparseLtSpMMACompressedSize": [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t),
    ],
    "cusparseLtMatmul": [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
    ],
}


def _bind(lib) -> None:
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    lib.cusparseLtGetErrorString.argtypes = [ctypes.c_int]
    lib.cusparseLtGetErrorString.restype = ctypes.c_char_p


def _site_dirs() -> list[str]:
    """sys.path, then the interpreter's site-packages folders (a venv may not list them all)."""
    dirs = list(sys.path)
    with contextlib.suppress(AttributeError, OSError):  # some embedded interpreters lack `site` helpers
        dirs += [*site.getsitepackages(), site.getusersitepackages()]
    return list(dict.fromkeys(d for d in dirs if d))


def library_candidates() -> list[str]:
    """The names and paths `load_library` tries, in order."""
    # The copy torch loaded comes first: dlopen of its soname returns the object already in the process.
    names = ["libcusparseLt.so.0"]
    for entry in _site_dirs():
        for sub in WHEEL_LIB_DIRS:
            lib = Path(entry) / sub / "libcusparseLt.so.0"
            if lib.is_file() and str(lib) not in names:
                names.append(str(lib))
    found = ctypes.util.find_library("cusparseLt")
    if found:
        names.append(found)
    return names


def load_library():
    """The cuSPARSELt shared library, bound; raises OSError when none can be opened."""
    errors = []
    for name in library_candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError as err:
            errors.append(f"{name}: {err}")
            continue
        _bind(lib)
        return lib
    raise OSError("cuSPARSELt could not be opened: " + "; ".join(errors))
