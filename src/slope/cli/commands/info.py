"""`slope info`: versions, the GPU and its capability, and which sparse backends work here (and why not)."""

from __future__ import annotations

import json
import platform


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--device", default=None, help="device to check (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def collect(device: str | None = None) -> dict:
    """Everything `slope info` reports, as a plain dict."""
    import torch

    import slope
    from slope.backends import availability, cusparselt_plans_status
    from slope.cli.errors import UserError
    from slope.devices import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise UserError(f"--device: {err}") from None
    cusparselt = getattr(torch.backends, "cusparselt", None)
    info: dict = {
        "slope": slope.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt": cusparselt.version() if cusparselt is not None and cusparselt.is_available() else None,
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({
                "index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            })
    info["device"] = str(dev)
    info["backends"] = availability(dev)
    info["cusparselt_plans"] = cusparselt_plans_status()  # decided by the availability check above
    return info


def run(args) -> int:
    info = collect(args.device)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"slope {info['slope']}  python {info['python']}  torch {info['torch']}  CUDA {info['cuda'] or '-'}  "
          f"cuSPARSELt {info['cusparselt'] or '-'}")
    if not info["gpus"]:
        print("GPU: none")
    for gpu in info["gpus"]:
        print(f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, {gpu['memory_gib']} GiB")
    print(f"backends on {info['device']} (2:4, bfloat16):")
    for name, reason in info["backends"].items():
        print(f"  {name}: works" if reason is None else f"  {name}: unavailable ({reason})")
    print(f"cuSPARSELt cached plans: {info['cusparselt_plans']}")
    return 0
