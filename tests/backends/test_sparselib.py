"""The 2:4 libraries: the emulated one on CPU (layout and exact products), the CUDA ones' static checks."""


import pytest
import torch
from _backend_helpers import layer_masks

from slope.backends.sparselib import (
    CUSPARSELT,
    CUTLASS,
    EMULATED,
    LIBRARIES,
    TUNE_MIN_DIM,
    Compressed,
    CusparseLt,
    Kernel,
)
from slope.config import BACKENDS, CUDA_BACKENDS
from slope.masks import gather_values, pack_group_bits


def two_four(rows=32, cols=64, dtype=torch.float64, seed=0):
    w_r, row_mask, _ = layer_masks(rows, cols, seed=seed, dtype=torch.float64)
    return w_r.to(dtype), row_mask


def test_libraries_are_the_configured_backend_names():
    assert set(LIBRARIES) == set(BACKENDS) - {"auto", "reference"}
    assert set(CUDA_BACKENDS) < set(LIBRARIES)


def test_emulated_buffer_is_kept_values_then_mask_metadata():
    a, row_mask = two_four()
    op = EMULATED.compress(a)
    assert (op.rows, op.cols, op.meta, op.packed.shape) == (32, 64, None, (32 * 32 + 32 * 16,))
    assert torch.equal(op.value_view(), gather_values(a, row_mask))  # row-major, in position order
    assert torch.equal(op.metadata(), pack_group_bits(row_mask, 4, dim=1).to(a.dtype).reshape(-1))
    # compressing the 0/1 mask gives the same metadata: what in-place updates rely on
    assert torch.equal(EMULATED.compress(row_mask.to(a.dtype)).metadata(), op.metadata())


def test_emulated_decompresses_exactly_even_with_zeros_kept():
    a, _ = two_four()
    a[:, :8] = 0.0  # whole groups of zeros: positions come from the tie rule
    a[3, 9] = 0.0  # a group with one non-zero
    assert torch.equal(EMULATED.decompress(EMULATED.compress(a)), a)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["tr", "nt"])
def test_emulated_products_are_exact(dtype, layout):
    a, _ = two_four(48, 64, dtype)
    b = torch.randn(16, 64).to(dtype)
    y = EMULATED.mm_t(b, EMULATED.compress(a), (layout, 0))
    assert y.shape == (16, 48)
    expected = b @ a.t() if layout == "tr" else (a @ b.t()).t()  # "nt": A @ bᵀ, returned transposed
    assert torch.equal(y, expected)
    if layout == "nt":
        assert not y.is_contiguous()  # a view, as cuSPARSELt's "nt" layout returns


def test_emulated_runs_any_float_dtype_on_any_device():
    assert EMULATED.unavailable_reason(torch.device("cpu"), torch.float64) is None
    assert EMULATED.unavailable_reason(torch.device("cpu"), torch.bfloat16) is None
    assert "torch.int32 is not supported" in EMULATED.unavailable_reason(torch.device("cpu"), torch.int32)
    assert list(EMULATED.tuning_kernels(EMULATED.compress(two_four()[0]), torch.zeros(8, 64))) == [Kernel("nt")]


@pytest.mark.parametrize("lib", [CUSPARSELT, CUTLASS], ids=lambda lib: lib.name)
def test_cuda_libraries_refuse_other_devices(lib):
    assert lib.unavailable_reason(torch.device("cpu"), torch.bfloat16) == "device cpu is not a CUDA device"


class SearchingCusparseLt(CusparseLt):
    """cuSPARSELt whose algorithm search answers 7 (the real one needs a GPU)."""

    def search_alg(self, b, a, layout):
        return 7


@pytest.mark.parametrize(
    ("size", "tokens", "dtype", "expected"),
    [
        (TUNE_MIN_DIM, TUNE_MIN_DIM, torch.bfloat16, [Kernel("nt"), Kernel("tr", 7), Kernel("nt", 7)]),
        # fp16 searches too: the search runs in a child process, where a crash costs only the search
        (TUNE_MIN_DIM, TUNE_MIN_DIM, torch.float16, [Kernel("nt"), Kernel("tr", 7), Kernel("nt", 7)]),
        # small products are dominated by the per-call overhead: the default call only
        (TUNE_MIN_DIM // 2, TUNE_MIN_DIM, torch.bfloat16, []),
        (TUNE_MIN_DIM, TUNE_MIN_DIM // 2, torch.bfloat16, []),
    ],
)
def test_cusparselt_tuning_candidates(size, tokens, dtype, expected):
    a = Compressed(size, TUNE_MIN_DIM, torch.empty(0), None)
    assert list(SearchingCusparseLt().tuning_kernels(a, torch.empty(tokens, TUNE_MIN_DIM, dtype=dtype))) == expected


def test_cusparselt_candidates_with_cached_plans_cover_algorithms_split_k_and_layouts(monkeypatch):
    class Plans:  # the plan cache's answer for this product: algorithms 0..2
        def plan_cache(self, device):
            return self

        def max_alg_id(self, device_index, dtype, rows, cols, tokens):
            assert (rows, cols, tokens) == (TUNE_MIN_DIM, 2 * TUNE_MIN_DIM, TUNE_MIN_DIM)
            return 2

    monkeypatch.setattr(CusparseLt, "plans_module", staticmethod(lambda: Plans()))
    a = Compressed(TUNE_MIN_DIM, 2 * TUNE_MIN_DIM, torch.empty(0), None)
    found = list(CusparseLt().tuning_kernels(a, torch.empty(TUNE_MIN_DIM, 2 * TUNE_MIN_DIM, dtype=torch.bfloat16)))
    assert found == [Kernel(layout, alg, split) for layout in ("tr", "nt") for alg in range(3) for split in (1, 2, 4)]
