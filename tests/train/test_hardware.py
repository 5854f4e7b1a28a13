"""The precision rules of a run (`slope.train.hardware`): what `run.precision` autocasts to on each device,
and the combinations refused before anything is written, "auto" judged by what it resolves to."""

from __future__ import annotations

import pytest
import torch

from slope.train import hardware
from slope.train.runconfig import ConfigError, RunSection

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def gpu_half(monkeypatch):
    """A GPU whose 16-bit dtype is the one given (no GPU is needed: only the dtype query is answered)."""
    def use(dtype):
        monkeypatch.setattr(hardware, "half_dtype", lambda device: dtype)
    return use


@pytest.mark.parametrize(("precision", "expected"), [("auto", None), ("fp32", None), ("bf16", torch.bfloat16)])
def test_cpu_autocasts_to(precision, expected):
    assert hardware.autocast_dtype(RunSection(precision=precision), CPU) is expected


@pytest.mark.parametrize(("half", "parallel"), [(torch.bfloat16, "fsdp"), (torch.bfloat16, "none"), (torch.float16, "ddp")])
def test_auto_on_a_gpu_is_its_16_bit_dtype(gpu_half, half, parallel):
    gpu_half(half)
    assert hardware.autocast_dtype(RunSection(precision="auto", parallel=parallel), GPU) is half


@pytest.mark.parametrize(("precision", "parallel", "device", "half", "message"), [
    ("fp16", "none", CPU, None, "run.precision=fp16 is not supported on CPU; use fp32 or bf16"),
    ("fp16", "fsdp", GPU, torch.bfloat16, "run.precision=fp16 with run.parallel=fsdp is not supported"),
    ("auto", "fsdp", GPU, torch.float16, "run.precision=auto is fp16 on this GPU (it has no bf16)"),
])
def test_refused(gpu_half, precision, parallel, device, half, message):
    gpu_half(half)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        hardware.autocast_dtype(RunSection(precision=precision, parallel=parallel), device)
