"""Memory of dense and SLoPe training and inference at LLaMA-3-8B and OPT-66B, estimated on a simulated GPU.

    python benchmarks/memory.py                     # the estimates: benchmarks/results/memory.{json,md,png}
    python benchmarks/memory.py --measure --out DIR # on a GPU: the estimate against torch.cuda.max_memory_allocated
    python benchmarks/memory.py --measure --out DIR --device cpu --width tiny   # the same plumbing on a CPU

The estimates run the real model, optimizer and 2:4 CUDA code path on fake tensors (`slope memory`,
src/slope/train/memory_estimate.py), so they need no GPU and allocate nothing. Each row shows the
floor (what the maths needs, docs/gpu.md "Memory") beside the estimate, and the 8B-width rows the
H200 measurement of 2026-11-28 (older code) beside them.

`--measure` trains and prefills the 8B-width model (4 blocks, 8192 tokens) for real on the device
and compares the peak the CUDA allocator saw with the estimate of the same configuration: the
estimator's validation on a GPU (target: within 5 %).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report

GIB = 2**30
# H200, 2026-11-28, benchmarks/results/gpu_h200_20261128/gpu_e2e.md: SLoPe / dense at 8B width, 4 blocks
H200_20261128 = {"train_peak": 1.07, "train_state": 0.843, "prefill_peak": 1.182, "prefill_state": 1.37}

# the configuration of benchmarks/gpu_e2e.py --widths 8b --layers 4, whose H200 figures stand beside
WIDTH = {"model": "llama3-8b-width", "keep_first_linear_dense": False}
# (row name, MemoryRequest fields, which total the row is about, metric name, target ratio or None)
ROWS = [
    ("training state, LLaMA-3-8B, full depth, bf16 autocast, AdamW",
     {"model": "llama3-8b", "mode": "train", "batch": 1, "seq_len": 2048}, "state_bytes", "train_state_ratio_8b", None),
    ("training peak, 8B width (4 blocks, vocab 8192), 8192 tokens",
     {**WIDTH, "mode": "train", "batch": 4, "seq_len": 2048}, "peak_bytes", "train_peak_ratio_8b_width", 0.80),
    ("training state, 8B width (4 blocks, vocab 8192)",
     {**WIDTH, "mode": "train", "batch": 4, "seq_len": 2048}, "state_bytes", "train_state_ratio_8b_width", None),
    ("prefill peak, 8B width (4 blocks, vocab 8192), 16384 tokens",
     {**WIDTH, "mode": "prefill", "batch": 8, "seq_len": 2048}, "peak_bytes", "prefill_peak_ratio_8b_width", None),
    ("inference weights, 8B width (4 blocks, vocab 8192)",
     {**WIDTH, "mode": "prefill", "batch": 1, "seq_len": 128}, "state_bytes", "infer_weights_ratio_8b_width", None),
    ("inference weights, LLaMA-3-8B, bf16",
     {"model": "llama3-8b", "mode": "prefill", "batch": 1, "seq_len": 128}, "state_bytes", "infer_weights_ratio_8b", 0.63),
    ("inference weights, LLaMA-3-8B, bf16, with adapters (rank 1/64 of each layer's smaller side)",
     {"model": "llama3-8b", "mode": "prefill", "batch": 1, "seq_len": 128, "adapters": True}, "state_bytes",
     "infer_weights_ratio_8b_adapters", None),
    ("training state, LLaMA-3-8B, with adapters (rank 1/64)",
     {"model": "llama3-8b", "mode": "train", "batch": 1, "seq_len": 2048, "adapters": True}, "state_bytes",
     "train_state_ratio_8b_adapters", None),
    ("inference weights, OPT-66B, bf16",
     {"model": "opt-66b", "mode": "prefill", "batch": 1, "seq_len": 128}, "state_bytes", "infer_weights_ratio_66b", 0.60),
]


def estimates() -> tuple[dict, list[dict]]:
    from slope.train.memory_estimate import MemoryRequest, compare

    metrics, rows = {}, []
    cached: dict[tuple, dict] = {}
    for name, fields, total, metric, target in ROWS:
        key = tuple(sorted(fields.items()))
        if key not in cached:
            print(f"estimating {name} ...", flush=True)
            cached[key] = compare(MemoryRequest(**fields))
        result = cached[key]
        dense, sparse = result["dense"], result["slope"]
        ratio = sparse[total] / dense[total]
        floor = sparse["floor_bytes"] / dense["floor_bytes"] if total == "state_bytes" else None
        h200 = {"train_state_ratio_8b_width": H200_20261128["train_state"],
                "train_peak_ratio_8b_width": H200_20261128["train_peak"],
                "prefill_peak_ratio_8b_width": H200_20261128["prefill_peak"],
                "infer_weights_ratio_8b_width": H200_20261128["prefill_state"]}.get(metric)
        metrics[metric] = round(ratio, 4)
        rows.append({
            "row": name, "request": sparse["request"], "dense_gib": dense[total] / GIB, "slope_gib": sparse[total] / GIB,
            "ratio": ratio, "floor_gib": sparse["floor_bytes"] / GIB if total == "state_bytes" else None,
            "floor_ratio": floor, "over_floor": sparse[total] / sparse["floor_bytes"] if total == "state_bytes" else None,
            "target": target, "meets_target": None if target is None else ratio <= target, "h200_20261128": h200,
            "slope_by_kind_gib": {k: v / GIB for k, v in sparse["state_by_kind" if total == "state_bytes" else "peak_by_kind"].items() if v},
            "dense_by_kind_gib": {k: v / GIB for k, v in dense["state_by_kind" if total == "state_bytes" else "peak_by_kind"].items() if v},
        })
    return metrics, rows


def table(rows: list[dict]) -> str:
    lines = ["| what | dense GiB | SLoPe GiB | SLoPe / dense | floor / dense | SLoPe / floor | target | H200 2026-11-28 (older code) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def opt(x, fmt):
            return "—" if x is None else format(x, fmt)
        target = "—" if r["target"] is None else f"≤ {r['target']:.2f} ({'met' if r['meets_target'] else 'NOT met'})"
        lines.append(f"| {r['row']} | {r['dense_gib']:.2f} | {r['slope_gib']:.2f} | {r['ratio']:.3f} | "
                     f"{opt(r['floor_ratio'], '.3f')} | {opt(r['over_floor'], '.3f')} | {target} | {opt(r['h200_20261128'], '.3f')} |")
    lines += ["", "By kind (GiB, SLoPe vs dense):", ""]
    for r in rows:
        kinds = sorted(set(r["slope_by_kind_gib"]) | set(r["dense_by_kind_gib"]))
        lines.append(f"- {r['row']}: " + ", ".join(
            f"{k} {r['dense_by_kind_gib'].get(k, 0):.2f} → {r['slope_by_kind_gib'].get(k, 0):.2f}" for k in kinds))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Stacked bars by kind, dense and SLoPe per row of the table, each scaled by the row's dense total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["parameters", "operands", "optimizer", "buffers", "gradients", "activations", "kv cache", "temporaries"]
    fig, ax = plt.subplots(figsize=(11, 5))
    ticks, labels, seen = [], [], set()
    for i, r in enumerate(rows):
        for j, (side, by_kind) in enumerate((("dense", r["dense_by_kind_gib"]), ("SLoPe", r["slope_by_kind_gib"]))):
            x = 2.6 * i + j
            bottom = 0.0
            for k, kind in enumerate(kinds):
                value = by_kind.get(kind, 0.0) / max(r["dense_gib"], 1e-12)
                if value:
                    ax.bar(x, value, bottom=bottom, color=f"C{k}", label=None if kind in seen else kind)
                    seen.add(kind)
                    bottom += value
            ticks.append(x)
            labels.append(f"{side}\nrow {i + 1}")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("bytes / the row's dense total")
    ax.set_title("memory by kind, per row of memory.md (estimated on a simulated H100)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(out: Path, device: str, width: str) -> int:
    """Train and prefill for real on `device` and compare the allocator's peak with the estimate."""
    import torch

    from slope.train.memory_estimate import MemoryRequest, build, estimate_memory

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("memory --measure: no CUDA device here (use --device cpu --width tiny for the rehearsal)")
    fields = ({**WIDTH, "batch": 4, "seq_len": 2048} if width == "8b"
              else {"model": "default", "layers": 2, "batch": 2, "seq_len": 64})
    rows, metrics = [], {}
    for method in ("dense", "slope"):
        request = MemoryRequest(**fields, method=method, mode="train",
                                precision="bf16-autocast" if device == "cuda" else "fp32",
                                backend="auto" if device == "cuda" else "reference")
        estimate = estimate_memory(request, on_gpu=device == "cuda")
        torch.manual_seed(0)
        with torch.device(device):
            model = build(request)
        measured = _train_peak(model, request, torch.device(device))
        rows.append({"method": method, "estimate_gib": estimate["peak_bytes"] / GIB,
                     "measured_gib": measured / GIB if measured else None,
                     "estimate_over_measured": estimate["peak_bytes"] / measured if measured else None})
        if measured:
            metrics[f"{method}_train_peak_estimate_over_measured"] = round(estimate["peak_bytes"] / measured, 4)
        _report.write("memory_measured", metrics, rows, "\n".join(
            f"- {r['method']}: estimate {r['estimate_gib']:.3f} GiB, measured "
            f"{'—' if r['measured_gib'] is None else format(r['measured_gib'], '.3f')} GiB" for r in rows), out_dir=out)
    return 0


def _train_peak(model, request, device) -> int | None:
    """Peak bytes the allocator saw in the second of two training steps (None where it cannot tell)."""
    import torch
    import torch.nn.functional as F

    from slope.linear import track_steps

    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-4, fused=True)
    track_steps(optimizer)  # the second step refreshes the operands as a training run's does
    tokens = torch.randint(0, model.config.vocab_size, (request.batch, request.seq_len + 1), device=device)
    autocast = request.precision.endswith("autocast")
    for step in range(2):
        if step == 1 and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        del logits
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device)
    return None  # a CPU has no allocator statistics: the rehearsal checks the plumbing only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="compare the estimate with real allocations")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    parser.add_argument("--device", default="cuda", help="with --measure: cuda, or cpu for the rehearsal")
    parser.add_argument("--width", default="8b", choices=["8b", "tiny"], help="with --measure: the model's width")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if args.measure:
        return measure(args.out or _report.RESULTS, args.device, args.width)
    metrics, rows = estimates()
    out = args.out or _report.RESULTS
    plot(rows, Path(out) / "memory.png")
    notes = ("Estimates on a simulated NVIDIA H100 through the real CUDA code path on fake tensors (`slope memory`); "
             "not counted: the CUDA context, library workspaces, the caching allocator's rounding. Training: two AdamW "
             "steps (fused), bf16 autocast with fp32 weights; the state is what lives between steps (gradients freed). "
             "Inference: bf16 weights loaded with `inference=True` (values stored inside the compressed operands, M_C "
             "dropped). The floor counts mask bits at 1 bit per position; the library stores 2 (a nibble per group "
             "of 4 in a byte), and keeps M_R at inference, which the floor does not. The H200 column is "
             "benchmarks/results/gpu_h200_20261128/gpu_e2e.md (older code, measured). Plot: memory.png.")
    _report.write("memory", metrics, rows, table(rows), notes, out_dir=out)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
