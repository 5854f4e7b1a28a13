"""Which device and which half-precision dtype: the one place that decides "cuda or cpu, bf16 or fp16"."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when this machine has it, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A torch.device from "auto"/None (see `default_device`), "cpu", "cuda", "cuda:N", "mps", ...

    Raises ValueError naming the value when it is not a device, or names a CUDA device this
    machine does not have.
    """
    if name is None or name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name!r} is not a device (expected auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA device is available here (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def half_dtype(device: torch.device) -> torch.dtype:
    """The 16-bit dtype to compute in on `device`: bf16 where the GPU supports it, else fp16 (the
    precisions 2:4 sparse tensor cores run). CPUs get bf16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
