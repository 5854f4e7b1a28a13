"""slope.devices: the one place that turns a device name into a device, and picks the 16-bit dtype."""

from __future__ import annotations

import pytest
import torch

from slope.devices import default_device, half_dtype, resolve_device


def test_auto_and_none_mean_the_default_device():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert default_device() == resolve_device("auto") == resolve_device(None) == expected


def test_plain_names_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "cpu cpu"])
def test_a_non_device_is_named_in_the_error(name):
    with pytest.raises(ValueError, match=rf"{name!r} is not a device \(expected auto, cpu, cuda, cuda:N or mps\)"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_missing_cuda_is_one_clear_error(name):
    with pytest.raises(ValueError, match=rf"device {name!r}: no CUDA device is available here"):
        resolve_device(name)


def test_half_dtype_on_cpu_is_bfloat16():
    # CPUs have no fp16 matmul worth using; bf16 is what autocast supports there
    assert half_dtype(torch.device("cpu")) is torch.bfloat16
