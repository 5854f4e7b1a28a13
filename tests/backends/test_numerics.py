"""Tolerances, the numerics check and the layout check, against libraries right and wrong."""

import math

import pytest
import torch
from _backend_helpers import emulated_backend

from slope.backends.numerics import NumericsError, layout_check, numerics_check, rel_error, tolerance
from slope.backends.select import Selector
from slope.backends.sparselib import CUTLASS, EMULATED, Compressed, Emulated


class WrongProducts(Emulated):
    """A library whose products are 10 % off (a wrong kernel)."""

    def mm_t(self, b, a, kernel):
        return 1.1 * super().mm_t(b, a, kernel)


class ShuffledValues(Emulated):
    """A library whose buffer is not in gather order (values reversed per row): correct products,
    but in-place value updates would scramble them."""

    @staticmethod
    def _flip(a: Compressed) -> Compressed:
        vals = a.value_view().flip(1).reshape(-1)
        return Compressed(a.rows, a.cols, torch.cat([vals, a.metadata()]), None, a.inplace)

    def compress(self, dense):
        return self._flip(super().compress(dense))

    def mm_t(self, b, a, kernel):
        return super().mm_t(b, self._flip(a), kernel)


class Failing(Emulated):
    def compress(self, dense):
        raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED")


def test_tolerance_and_relative_error():
    assert tolerance(torch.bfloat16) == 4 * 2**-7 and tolerance(torch.float16) == 4 * 2**-10
    assert tolerance(torch.float64) == 1e-6
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert rel_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_numerics_check_passes_the_emulated_library(dtype):
    assert numerics_check(emulated_backend(dtype, inplace=True), "cpu") < tolerance(dtype)
    assert numerics_check(emulated_backend(dtype, inplace=False), "cpu") < tolerance(dtype)


def test_numerics_check_rejects_a_wrong_kernel():
    with pytest.raises(NumericsError, match=r"emulated output for shape \(32, 64\).*above the tolerance"):
        numerics_check(emulated_backend(torch.bfloat16, lib=WrongProducts()), "cpu")
    selector = Selector(libraries={"emulated": WrongProducts()})
    with pytest.raises(RuntimeError, match="differs from the reference"):
        selector.select("emulated", device="cpu", dtype=torch.bfloat16, n=2, m=4, shape=(32, 64))


def test_layout_check_accepts_gather_order_and_refuses_others():
    assert layout_check(EMULATED, "cpu", torch.bfloat16)
    assert not layout_check(ShuffledValues(), "cpu", torch.bfloat16)
    # the shuffled library is still right when every step compresses again
    assert numerics_check(emulated_backend(torch.bfloat16, lib=ShuffledValues(), inplace=False), "cpu") < 1e-2


def test_cutlass_packing_keeps_values_in_gather_order():
    # PyTorch's CUTLASS packing is plain tensor code, so its layout can be checked on CPU too
    assert layout_check(CUTLASS, "cpu", torch.float16)


def test_a_library_error_means_no_in_place_updates():
    assert not layout_check(Failing(), "cpu", torch.bfloat16)
