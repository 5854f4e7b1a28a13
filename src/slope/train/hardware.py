"""What a run computes on: its device (`run.device`), its autocast dtype and the rules of `run.precision`,
and torch's CPU threads (`run.threads`).

Each rule has one function here, called by every place that needs it (the trainer's set-up and
`slope.train.distributed.init`, which joins the process group before the trainer starts), so a bad
value is the same one-line error wherever it is first seen.
"""

from __future__ import annotations

import logging
import os

import torch

from slope.devices import half_dtype, resolve_device
from slope.train.runconfig import ConfigError, RunSection

log = logging.getLogger("slope")

_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_device(name: str) -> torch.device:
    """The device `run.device` names; a name that is no device, or one this machine lacks, is a ConfigError."""
    try:
        return resolve_device(name)
    except ValueError as err:
        raise ConfigError(f"config key 'run.device': {err}") from None


def check_precision(run: RunSection, device: torch.device) -> None:
    """Every rule `run.precision` must keep on `device` with `run.parallel`; ConfigError saying what to use.

    fp16 trains through a loss scaler (`torch.amp.GradScaler`): FSDP2's sharded gradients are not
    seen by it, and CPU autocast has no fp16 path. A method's own rules (SR-STE refuses fp16) are in
    its `preflight`.
    """
    if _resolved_precision(run, device) != "fp16":
        return
    if run.parallel == "fsdp":  # run.parallel=fsdp is the only setting that resolves to FSDP
        if run.precision == "auto":
            raise ConfigError("run.precision=auto is fp16 on this GPU (it has no bf16), and fp16 with "
                              "run.parallel=fsdp is not supported (its loss scaler does not see sharded "
                              "gradients); use run.precision=fp32")
        raise ConfigError("run.precision=fp16 with run.parallel=fsdp is not supported (its loss scaler does not see "
                          "sharded gradients); use bf16")
    if device.type == "cpu":
        raise ConfigError("run.precision=fp16 is not supported on CPU; use fp32 or bf16")


def _resolved_precision(run: RunSection, device: torch.device) -> str:
    """`run.precision` with "auto" resolved on `device`: fp32 on CPU, the GPU's 16-bit dtype on a GPU."""
    if run.precision != "auto":
        return run.precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if half_dtype(device) == torch.bfloat16 else "fp16"


def autocast_dtype(run: RunSection, device: torch.device) -> torch.dtype | None:
    """The dtype the run's forward autocasts to on `device`, or None for plain fp32 (rules: `check_precision`)."""
    check_precision(run, device)
    # auto: bf16 autocast gave no gain on CPU (measured); a GPU computes in its 16-bit dtype
    return _AUTOCAST_DTYPES[_resolved_precision(run, device)]


def pick_threads(setting: int) -> int:
    """torch's CPU threads for this process: `setting`, or for 0 the cores not busy with other work.

    On a shared 2-core machine torch's default (one thread per core) ran the tiny run at 145 tokens/s
    against about 2,900 with one thread: threads that wait on cores another process holds spin in vain.
    So "auto" takes the cores left free by the 1-minute load average, divided among this machine's
    processes of the run (torchrun's LOCAL_WORLD_SIZE), and never more than torch's default.
    """
    if setting > 0:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    free = max(1, round(cores - busy))
    return max(1, min(torch.get_num_threads(), free // local))


def apply_threads(setting: int) -> int:
    """Set torch's CPU threads from run.threads (see pick_threads), log it, and return the count."""
    threads = pick_threads(setting)
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d%s", threads, " (run.threads = auto)" if not setting else "")
    return threads
