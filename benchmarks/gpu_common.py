"""Shared pieces of the GPU benchmarks: CUDA-event timing and the common result schema (see benchmarks/_report.py).

Every result JSON: {"benchmark", "command", "date", "hardware", "versions", "metrics", "rows"};
next to it a markdown file with the same header and a table.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from slope.backends.timing import time_ms as _time_ms


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Milliseconds per call of `fn` run back to back (CUDA events around `reps` calls), median of
    3 rounds, after `warmup` calls: the timing the library's own set-up decisions use."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return _time_ms(fn, "cuda", reps=reps)


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict:
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    driver=_driver())
    return info


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


def write(out_dir: Path, name: str, metrics: dict, rows: list[dict], table: str, notes: str = "") -> Path:
    """Write `<name>.json` and `<name>.md` into `out_dir`; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result = {
        "benchmark": name, "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(), "versions": versions(), "metrics": metrics, "rows": rows,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    hw = ", ".join(f"{k}={v}" for k, v in result["hardware"].items() if v is not None)
    ver = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v is not None)
    md = [f"# {name}", "", f"- date: {result['date']}", f"- command: `{command}`", f"- hardware: {hw}",
          f"- versions: {ver}", "", "| metric | value |", "|---|---|",
          *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
          "", table, "", notes]
    (out_dir / f"{name}.md").write_text("\n".join(md).rstrip() + "\n")
    return path


def md_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return "\n".join([
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows],
    ])
