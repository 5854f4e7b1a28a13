"""Shared result writer for benchmarks: one JSON schema plus a markdown table.

Every result JSON has the same top level, so runs compare across machines:
{"benchmark", "command", "date", "hardware", "versions", "metrics": {name: number}, "rows": [...]},
with the headline ratios (e.g. `step_time_ratio_slope_over_dense`) under "metrics".
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def hardware() -> dict:
    info = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def versions() -> dict:
    import transformers

    import slope

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "slope": slope.__version__,
        "cuda": torch.version.cuda,
    }


def _repo_relative(path: str) -> str:
    """A script path as run from the repository root (reports must not name this machine's folders)."""
    root = RESULTS.parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return path


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write(name: str, metrics: dict, rows: list[dict], table: str, notes: str = "", out_dir: Path | None = None) -> Path:
    """Write `<name>.json` and `<name>.md` under benchmarks/results/ (or out_dir); returns the JSON path."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [_repo_relative(sys.argv[0]), *sys.argv[1:]])
    result = {
        "benchmark": name,
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "versions": versions(),
        "metrics": metrics,
        "rows": rows,
    }
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    hw = ", ".join(f"{k}={v}" for k, v in result["hardware"].items() if v is not None)
    ver = ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v is not None)
    md = [
        f"# {name}",
        "",
        f"- date: {result['date']}",
        f"- command: `{command}`",
        f"- hardware: {hw}",
        f"- versions: {ver}",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()],
        "",
        table,
        "",
        notes,
    ]
    (out_dir / f"{name}.md").write_text("\n".join(md).rstrip() + "\n")
    return json_path
