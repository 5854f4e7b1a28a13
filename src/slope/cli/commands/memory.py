"""`slope memory`: will this model fit on my GPU, dense or sparse? Estimated on any machine, no GPU needed."""

from __future__ import annotations

import json

GIB = 2**30


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text + (
        ". Runs the real model, sparsify, optimizer and the 2:4 CUDA code path on fake tensors on a "
        "simulated GPU: nothing is allocated. Not counted: the CUDA context, library workspaces and the "
        "caching allocator's rounding (a few hundred MiB)."))
    p.add_argument("model", nargs="?", default="default",
                   help="default, gpu-gpt2-small, llama3-8b, opt-66b, or a transformers config.json (default: default)")
    p.add_argument("--mode", default="train", help="train, prefill or decode (default: train)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8 train, 1 prefill/decode)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 256, llama3-8b/opt-66b 2048)")
    p.add_argument("--precision", default="bf16-autocast",
                   help="bf16-autocast (fp32 weights, the default), fp16-autocast, bf16, fp16 or fp32")
    p.add_argument("--layers", type=int, default=None, help="keep only this many decoder blocks (full width)")
    p.add_argument("--adapters", action="store_true", help="with the lazy adapters added (SLoPe's last 1 %%)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--parallel", default="none", help="none, or fsdp: memory per rank of --world ranks (training)")
    p.add_argument("--world", type=int, default=1, help="with --parallel fsdp: the number of ranks (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f}" if nbytes < 10 * GIB else f"{nbytes / GIB:.1f}"


def table(result: dict) -> str:
    """Dense and SLoPe side by side: totals, the floor, and each kind at the peak and in the state."""
    from slope.memory import LIVE_KINDS

    dense, sparse = result["dense"], result["slope"]
    req = sparse["request"]
    per_rank = f", FSDP per rank of {req['world']}" if req["parallel"] == "fsdp" else ""
    lines = [f"{req['model']}: {req['mode']}{per_rank}, batch {req['batch']} x {req['seq_len']} tokens, {req['precision']}, "
             f"{sparse['parameters']:,} parameters, simulated {sparse['gpu']} ({sparse['backend']})", "",
             f"{'GiB':<26}{'dense':>12}{'SLoPe':>12}{'ratio':>9}"]

    def row(label: str, a: float, b: float) -> None:
        ratio = f"{b / a:.3f}" if a > 0 and b / a < 100 else "—"  # "—": nothing of this kind in dense
        lines.append(f"{label:<26}{_gib(a):>12}{_gib(b):>12}{ratio:>9}")

    row("peak", dense["peak_bytes"], sparse["peak_bytes"])
    row("state", dense["state_bytes"], sparse["state_bytes"])
    row("floor of the state", dense["floor_bytes"], sparse["floor_bytes"])
    for where, key in (("at the peak", "peak_by_kind"), ("in the state", "state_by_kind")):
        lines.append(f"{where}:")
        for kind in LIVE_KINDS:
            if dense[key].get(kind) or sparse[key].get(kind):
                row(f"  {kind}", dense[key].get(kind, 0), sparse[key].get(kind, 0))
    lines.append("state per module kind (SLoPe): " + ", ".join(
        f"{name} {_gib(sum(kinds.values()))}" for name, kinds in sorted(sparse["state_by_module_kind"].items())
        if sum(kinds.values())))
    return "\n".join(lines)


def run(args) -> int:
    from slope.cli.errors import UserError
    from slope.train.memory_estimate import MODELS, EstimateError, MemoryRequest, compare

    big = args.model in ("llama3-8b", "opt-66b")
    batch = args.batch if args.batch is not None else (8 if args.mode == "train" else 1)
    seq_len = args.seq_len if args.seq_len is not None else (2048 if big else 256)
    request = MemoryRequest(model=args.model, mode=args.mode, batch=batch, seq_len=seq_len, precision=args.precision,
                            layers=args.layers, adapters=args.adapters,
                            gradient_checkpointing=args.gradient_checkpointing, parallel=args.parallel,
                            world=args.world)
    try:
        request.check()
        result = compare(request)
    except EstimateError as err:
        raise UserError(str(err)) from None
    except (OSError, ValueError) as err:
        if args.model not in MODELS:
            raise UserError(f"model {args.model!r}: {' '.join(str(err).split())}") from None
        raise
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0
