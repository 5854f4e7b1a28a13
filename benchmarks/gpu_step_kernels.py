"""The fused per-step kernels against the plain-torch paths, at LLaMA-3-8B layer shapes (bf16 compute).

    python benchmarks/gpu_step_kernels.py [--out DIR]
    python benchmarks/gpu_step_kernels.py --out DIR --device cpu --shapes tiny   # rehearsal

For each shape (out, in) times (median of CUDA-event timings, `gpu_common.time_ms`):
    refresh   fused: `step_kernels.refresh_operands`, both prefixes in one launch
              today: the output prefix `copy_` + W_RCᵀ's values through the int32 index map
              (cat, index_select, copy_), as `OperandCache` does between column-mask refreshes
    compact   fused: `step_kernels.compact_grad` (bf16 dW -> fp32 kept values)
              today: `kept_positions` + `gather_kept` + `.to(fp32)`, as autograd does
    column    fused: `step_kernels.column_refresh` writing W_RCᵀ's values too
              today: W_R (fp32 scatter) + `nm_bits(W_R, dim=0)` + a new index map + index_select
and checks that both give the same tensors. The compression of the new mask (the same in both) is
not timed. Writes gpu_step_kernels.{json,md} (benchmarks/_report.py) into DIR after every shape, so a
run stopped by its time limit keeps the shapes it finished. With --device cpu (the rehearsal) the
"fused" calls run the plain-torch references (Triton runs on CUDA tensors only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # benchmarks/ is not a package: found through the path entry above
import gpu_common as bench
from gpu_common import time_ms

from slope.backends import step_kernels
from slope.backends.semistructured import value_index
from slope.masks import (
    gather_kept,
    gather_values,
    kept_positions,
    nm_bits,
    nm_mask,
    pack_group_bits,
    scatter_kept,
    unpack_group_bits,
)

SHAPE_SETS = {
    "llama3-8b": [("llama3-8b q/o", 4096, 4096), ("llama3-8b gate/up", 14336, 4096), ("llama3-8b down", 4096, 14336)],
    "tiny": [("tiny", 64, 128), ("tiny transposed", 128, 64)],  # the CPU rehearsal
}
SHAPES = SHAPE_SETS["llama3-8b"]
DTYPE = torch.bfloat16


def bench_shape(out_f: int, in_f: int, dev: torch.device, time_ms) -> dict:
    """One shape's row; `time_ms(fn)` times a callable (CUDA events on the GPU)."""
    w = torch.randn(out_f, in_f, device=dev)
    row_mask = nm_mask(w, 2, 4, dim=1)
    w_r = w * row_mask
    values = gather_values(w_r, row_mask).contiguous()  # (out, in/2) fp32 master values
    row_bits = pack_group_bits(row_mask, 4, dim=1)  # (out, in/4)
    col_bits = nm_bits(w_r, 2, 4, dim=0)  # (out/4, in)
    grad = torch.randn(out_f, in_f, device=dev, dtype=DTYPE)
    del w, w_r
    used = {k: step_kernels.uses_triton(k, dev, i, o) for k, i, o in (
        ("refresh_operands", torch.float32, DTYPE), ("compact_grad", DTYPE, torch.float32), ("column_refresh", torch.float32, DTYPE))}

    out_prefix = torch.empty(out_f, in_f // 2, device=dev, dtype=DTYPE)
    gi_prefix = torch.empty(in_f, out_f // 2, device=dev, dtype=DTYPE)
    # (in*out/2,) int32: 2 bytes per weight, kept between column-mask refreshes today
    index = value_index(row_mask, _col_mask(col_bits).t()).reshape(-1).to(torch.int32)

    def refresh_today():
        out_prefix.copy_(values)
        flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
        gi_prefix.copy_(flat.index_select(0, index).view(in_f, out_f // 2))

    def refresh_fused():
        step_kernels.refresh_operands(values, row_bits, col_bits, out_prefix, gi_prefix)

    def compact_today():
        return gather_kept(grad, kept_positions(row_bits, 2, 4)).to(torch.float32)

    def compact_fused():
        return step_kernels.compact_grad(grad, row_bits, torch.float32)

    def column_today():
        w_r = scatter_kept(values, kept_positions(row_bits, 2, 4), 4)  # StepWeights.dense()
        bits = nm_bits(w_r, 2, 4, dim=0)  # SlopeLinear._refresh_column_mask
        idx = value_index(row_mask, _col_mask(bits).t()).reshape(-1).to(torch.int32)  # OperandCache
        flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
        gi_prefix.copy_(flat.index_select(0, idx).view(in_f, out_f // 2))
        return bits

    def column_fused():
        return step_kernels.column_refresh(values, row_bits, gi_prefix)

    row = {"shape": f"{out_f}x{in_f}", "out": out_f, "in": in_f, **{f"triton_{k}": v for k, v in used.items()}}
    # the same results first (a benchmark of a wrong kernel is worthless)
    refresh_today()
    want = out_prefix.clone(), gi_prefix.clone()
    refresh_fused()
    row["refresh_exact"] = torch.equal(out_prefix, want[0]) and torch.equal(gi_prefix, want[1])
    row["compact_exact"] = torch.equal(compact_today(), compact_fused())
    bits_today, gi_today = column_today(), gi_prefix.clone()
    row["column_exact"] = torch.equal(column_fused(), bits_today) and torch.equal(gi_prefix, gi_today)
    for name, today, fused in (("refresh", refresh_today, refresh_fused), ("compact", compact_today, compact_fused),
                               ("column", column_today, column_fused)):
        row[f"{name}_today_ms"] = time_ms(today)
        row[f"{name}_fused_ms"] = time_ms(fused)
        row[f"{name}_speedup"] = row[f"{name}_today_ms"] / row[f"{name}_fused_ms"]
    return row


def _col_mask(col_bits: torch.Tensor) -> torch.Tensor:
    return unpack_group_bits(col_bits, 4, dim=0)  # (out, in) bool M_C


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="result folder (default benchmarks/results)")
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="llama3-8b")
    bench.add_device_args(p)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_step_kernels: needs a CUDA GPU (none found); nothing measured (--device cpu rehearses it)")
        return 2
    dev = bench.use_device(args.device)
    rows = []
    for name, out_f, in_f in SHAPE_SETS[args.shapes]:
        row = {"layer": name, **bench_shape(out_f, in_f, dev, time_ms)}
        rows.append(row)
        bench.empty_cache()
        print(f"{name:18s} {row['shape']:>11s}  refresh {row['refresh_speedup']:.2f}x  compact {row['compact_speedup']:.2f}x  "
              f"column {row['column_speedup']:.2f}x  exact: {row['refresh_exact']}/{row['compact_exact']}/{row['column_exact']}",
              flush=True)
        path = _report.write("gpu_step_kernels", summarize(rows), rows, table(rows), NOTES, out_dir=args.out)
    print(path)
    return 0


def summarize(rows: list[dict]) -> dict:
    metrics = {}
    for k in ("refresh", "compact", "column"):
        speedups = torch.tensor([r[f"{k}_speedup"] for r in rows])
        metrics[f"{k}_speedup_gmean"] = float(speedups.log().mean().exp())
    metrics["all_exact"] = all(r[f"{k}_exact"] for r in rows for k in ("refresh", "compact", "column"))
    metrics["all_triton"] = all(v for r in rows for k, v in r.items() if k.startswith("triton_"))
    return metrics


COLUMNS = ["layer", "shape", "refresh_today_ms", "refresh_fused_ms", "refresh_speedup", "compact_today_ms",
           "compact_fused_ms", "compact_speedup", "column_today_ms", "column_fused_ms", "column_speedup"]
NOTES = ("speedup = the plain-torch time / the fused kernel's. `all_triton` False means a kernel failed its "
         "self-check and the 'fused' column timed the reference.")


def table(rows: list[dict]) -> str:
    return "\n".join([
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
        *["| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |"
          for r in rows],
    ])


if __name__ == "__main__":
    sys.exit(main())
