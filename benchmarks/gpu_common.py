"""Shared pieces of the GPU benchmarks: CUDA-event timing and the common result schema (see benchmarks/_report.py).

Every result JSON: {"benchmark", "command", "date", "hardware", "versions", "metrics", "rows"};
next to it a markdown file with the same header and a table. The benchmarks rewrite both after every
measured row, so a run stopped by its time limit keeps what it finished.

Every GPU benchmark also runs on a CPU at tiny shapes (`--device cpu`, see `add_device_args`), with
the emulated 2:4 library in place of cuSPARSELt: the CPU rehearsal of benchmarks/gpu_check.sh runs
them so, to check their command lines and result files before a GPU is lent. Their numbers mean
nothing there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from slope.backends.timing import time_ms as _time_ms

# The device the benchmark runs on (`use_device`); "cuda" unless --device says otherwise.
DEVICE = torch.device("cuda")
# The 2:4 library on each kind of device: cuSPARSELt on a GPU, its plain-tensor emulation on a CPU.
LIBRARY_FOR = {"cuda": "cusparselt", "cpu": "emulated"}


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=sorted(LIBRARY_FOR), default="cuda",
                        help="cuda (the benchmark), or cpu: a tiny rehearsal with the emulated 2:4 library")


def use_device(name: str) -> torch.device:
    """Make `name` the device of this benchmark; one line of error if CUDA is asked for and missing."""
    global DEVICE
    DEVICE = torch.device(name)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name}: --device cuda, but CUDA is not available here "
                         "(use --device cpu for a rehearsal)")
    return DEVICE


def library_name(device: torch.device | None = None) -> str:
    return LIBRARY_FOR[(device or DEVICE).type]


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def autocast():
    """bf16 autocast on a GPU (fp32 master weights); none on a CPU, where the rehearsal runs fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if DEVICE.type == "cuda" else contextlib.nullcontext()


def compute_dtype() -> torch.dtype:
    """The dtype of the sparse products: bf16 on a GPU, fp32 on a CPU (emulated, exact either way)."""
    return torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def reset_peak_memory() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def allocated_bytes(peak: bool = False) -> int:
    """Memory allocated on the GPU now (or its peak); 0 on a CPU, where torch does not count it."""
    if DEVICE.type != "cuda":
        return 0
    return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()


def ratio(num: float, den: float) -> float:
    """num / den, NaN where den is 0 (memory on a CPU)."""
    return num / den if den else float("nan")


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Milliseconds per call of `fn` run back to back (CUDA events around `reps` calls on a GPU),
    median of 3 rounds, after `warmup` calls: the timing the library's own set-up decisions use."""
    for _ in range(warmup):
        fn()
    synchronize()
    return _time_ms(fn, DEVICE, reps=reps)


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache  # asked at every rewrite of a result: once per process is enough
def hardware() -> dict:
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "device": DEVICE.type}
    if DEVICE.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    driver=_driver())
    return info


@functools.cache
def versions() -> dict:
    import slope

    cslt = getattr(torch.backends, "cusparselt", None)
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        tf = None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cusparselt": cslt.version() if cslt is not None and cslt.is_available() else None,
        "transformers": tf, "slope": slope.__version__,
    }


def _replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a benchmark killed by its time limit mid-write keeps the
    previous version, never half a JSON file."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(out_dir: Path, name: str, metrics: dict, rows: list[dict], table: str, notes: str = "") -> Path:
    """Write `<name>.json` and `<name>.md` into `out_dir` (again after every row: each call replaces
    both); returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result = {
        "benchmark": name, "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(), "versions": versions(), "metrics": metrics, "rows": rows,
    }
    path = out_dir / f"{name}.json"
    _replace_text(path, json.dumps(result, indent=2) + "\n")
    hw = ", ".join(f"{k}={v}" for k, v in result["hardware"].items() if v is not None)
    ver = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v is not None)
    md = [f"# {name}", "", f"- date: {result['date']}", f"- command: `{command}`", f"- hardware: {hw}",
          f"- versions: {ver}", "", "| metric | value |", "|---|---|",
          *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
          "", table, "", notes]
    _replace_text(out_dir / f"{name}.md", "\n".join(md).rstrip() + "\n")
    return path


def md_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "\n".join([
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows],
    ])
