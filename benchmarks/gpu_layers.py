"""Per-layer SLoPe products on sparse tensor cores vs dense bf16 (cuBLAS), side by side in one run.

    python benchmarks/gpu_layers.py --out DIR [--tokens 2048 8192 16384] [--backend cusparselt]
    python benchmarks/gpu_layers.py --out DIR --device cpu --tokens 64 --sweep 64 128 --no-models   # rehearsal

For each linear shape (out, in) of LLaMA-3-8B, OPT-13B/30B/66B and a square hidden-size sweep,
and each token count T, times (median of CUDA-event timings):
    output       y  = x W_Rᵀ        dense: x @ Wᵀ            SLoPe: compressed W_R
    grad_input   dx = dy W_RC       dense: dy @ W            SLoPe: compressed W_RCᵀ
    grad_weight  dW = dyᵀ x         dense in both; SLoPe also gathers the kept entries (the path its backward runs)
    fwd+bwd      the three together (what one layer costs per training step)
and separately the per-step refresh cost of the compressed operands (in-place value write,
re-compression, column-mask refresh). With cuSPARSELt the sparse products run as the library runs
them (cached plans where `slope info` says they are on); `*_torch_call_ms` times the same product
through torch._cslt_sparse_mm, which builds its plan on every call, for comparison.
Writes gpu_layers.json/.md into DIR after every row (the sweep first: the plot needs it), so a run
stopped by its time limit keeps what it finished. With --device cpu the emulated 2:4 library runs
in fp32 (a rehearsal of the command and its files, whose numbers mean nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as bench
from gpu_common import md_table, time_ms, write

from slope.backends import cusparselt_plans
from slope.backends.numerics import layout_check
from slope.backends.semistructured import OperandCache, ProductPlan, SemiStructuredBackend, pad_to_rows
from slope.backends.sparselib import LIBRARIES, TOKEN_ALIGN, Compressed, Kernel
from slope.backends.tuning import Tuner
from slope.backends.weights import ColumnMask, StepWeights
from slope.config import CUDA_BACKENDS
from slope.masks import (
    column_mask,
    gather_kept,
    gather_values,
    kept_positions,
    nm_mask,
    pack_group_bits,
    scatter_values,
)

TUNER = Tuner()  # as training tunes: in a child process, results kept across runs


def model_shapes() -> list[tuple[str, int, int]]:
    """(name, out, in) of the linear layers of a transformer block."""
    shapes = [("llama3-8b q/o", 4096, 4096), ("llama3-8b k/v", 1024, 4096),
              ("llama3-8b gate/up", 14336, 4096), ("llama3-8b down", 4096, 14336)]
    for name, h in (("opt-13b", 5120), ("opt-30b", 7168), ("opt-66b", 9216)):
        shapes += [(f"{name} qkvo", h, h), (f"{name} fc1", 4 * h, h), (f"{name} fc2", h, 4 * h)]
    return shapes


SWEEP = [1024, 2048, 4096, 8192, 16384]


def bench_shape(kind: str, out_f: int, in_f: int, tokens: int, dtype=torch.bfloat16) -> dict:
    dev = bench.DEVICE
    w = torch.randn(out_f, in_f, device=dev)
    row_mask = nm_mask(w, 2, 4, dim=1)
    w_r = w * row_mask
    col_mask = column_mask(w_r, 2, 4)
    values = gather_values(w_r, row_mask)  # (out, in/2) fp32 master values
    del w
    lib = LIBRARIES[kind]
    be = SemiStructuredBackend(lib, dtype, (out_f, in_f), ProductPlan(), inplace=layout_check(lib, dev, dtype))
    # the kernels the library would pick for this shape and token count (tuned as at set-up)
    plan = be.plan
    plan.kernel.update(TUNER(be, dev, tokens).kernel)  # searched once per shape, cached ($SLOPE_TUNING_CACHE)
    cache = OperandCache(be, index_maps=True)
    row_bits = pack_group_bits(row_mask, 4, dim=1)  # (out, in/4) M_R as a layer stores it
    col = ColumnMask.from_mask(col_mask)
    op_out = cache.output(StepWeights(values, row_bits, 2, 4))
    op_gi = cache.grad_input(StepWeights(values, row_bits, 2, 4), col)
    w_d = w_r.to(dtype)  # the dense baseline's operand (same values; dense kernels ignore zeros)
    x = torch.randn(tokens, in_f, device=dev, dtype=dtype)
    dy = torch.randn(tokens, out_f, device=dev, dtype=dtype)

    row = {"shape": f"{out_f}x{in_f}", "out": out_f, "in": in_f, "tokens": tokens, "inplace_layout": be.inplace,
           "kernel_output": str(plan.kernel["output"]), "kernel_grad_input": str(plan.kernel["grad_input"])}
    def grad_weight_slope():
        # what SlopeLinear's backward runs: dW, the kept positions from the packed M_R (released
        # after forward, so built again here), the gather, and the cast to the fp32 values' dtype
        return gather_kept(dy.t() @ x, kept_positions(row_bits, 2, 4)).float()

    t = {
        "output_dense": time_ms(lambda: x @ w_d.t()),
        "output_slope": time_ms(lambda: be.output(x, op_out)),
        "grad_input_dense": time_ms(lambda: dy @ w_d),
        "grad_input_slope": time_ms(lambda: be.grad_input(dy, op_gi)),
        "grad_weight_dense": time_ms(lambda: dy.t() @ x),
        "grad_weight_slope": time_ms(grad_weight_slope),
    }

    def dense_step():
        x @ w_d.t()
        dy @ w_d
        dy.t() @ x

    def slope_step():
        be.output(x, op_out)
        be.grad_input(dy, op_gi)
        grad_weight_slope()

    for product, op, inp in (("output", op_out, x), ("grad_input", op_gi, dy)):
        per_call = torch_call_ms(be, op, inp, product)
        if per_call is not None:
            row[f"{product}_torch_call_ms"] = per_call
            row[f"{product}_plan_gain"] = per_call / t[f"{product}_slope"]

    t["fwd_bwd_dense"] = time_ms(dense_step)
    t["fwd_bwd_slope"] = time_ms(slope_step)
    for p in ("output", "grad_input", "grad_weight", "fwd_bwd"):
        row[f"{p}_speedup"] = t[f"{p}_dense"] / t[f"{p}_slope"]
    row.update({f"{k}_ms": v for k, v in t.items()})

    # refresh costs per optimizer step (only once per shape: they do not depend on T)
    if tokens == min(ARGS.tokens):
        version = [1]

        def bump():
            values.add_(0.0)  # an in-place update: bumps `_version` like an optimizer step
            version[0] += 1

        def inplace_output():
            bump()
            cache.output(StepWeights(values, row_bits, 2, 4))

        def inplace_grad_input():
            bump()
            cache.grad_input(StepWeights(values, row_bits, 2, 4), col)

        def recompress_grad_input():
            be.compress((scatter_values(values, row_mask) * col_mask).t())

        def column_refresh():
            c = column_mask(scatter_values(values, row_mask), 2, 4)
            be.compress_structured(c.t().contiguous(), gather_values((scatter_values(values, row_mask) * c).t(), c.t()))

        row["refresh_output_inplace_ms"] = time_ms(inplace_output, 1, 5)
        row["refresh_grad_input_inplace_ms"] = time_ms(inplace_grad_input, 1, 5)
        row["recompress_output_ms"] = time_ms(lambda: be.compress(scatter_values(values, row_mask)), 1, 5)
        row["recompress_grad_input_ms"] = time_ms(recompress_grad_input, 1, 5)
        row["column_mask_refresh_ms"] = time_ms(column_refresh, 1, 3)
    return row


def torch_call_ms(be, op, inp, product: str) -> float | None:
    """The product through torch._cslt_sparse_mm (a plan built per call), same operand and kernel."""
    if be.name != "cusparselt" or not isinstance(op, Compressed):
        return None
    layout, alg_id, split_k = Kernel.of(be.plan.kernel[product])
    b = pad_to_rows(inp, TOKEN_ALIGN)
    return time_ms(lambda: torch._cslt_sparse_mm(op.packed, b.t(), transpose_result=layout == "tr", alg_id=alg_id,
                                                 split_k=split_k))


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    p.add_argument("--backend", default=None, choices=[*CUDA_BACKENDS, "emulated"],
                   help="the 2:4 library (default: cusparselt on a GPU, emulated on a CPU)")
    p.add_argument("--sweep", type=int, nargs="*", default=SWEEP)
    p.add_argument("--no-models", action="store_true", help="only the hidden-size sweep")
    bench.add_device_args(p)
    ARGS = p.parse_args(argv)
    bench.use_device(ARGS.device)
    ARGS.backend = ARGS.backend or bench.library_name()
    dtype = bench.compute_dtype()
    # the sweep first: the plot needs it, and a run cut short keeps what was measured
    shapes = [(f"sweep h={h}", h, h) for h in ARGS.sweep]
    shapes += [] if ARGS.no_models else model_shapes()
    rows = []
    done = set()
    for name, out_f, in_f in shapes:
        for tokens in ARGS.tokens:
            key = (out_f, in_f, tokens)
            if key in done:
                row = dict(next(r for r in rows if (r["out"], r["in"], r["tokens"]) == key), layer=name)
            else:
                row = {"layer": name, **bench_shape(ARGS.backend, out_f, in_f, tokens, dtype)}
                done.add(key)
                bench.empty_cache()
            rows.append(row)
            print(f"{name:20s} {out_f:6d}x{in_f:<6d} T={tokens:6d}  output {row['output_speedup']:.2f}x  "
                  f"grad_input {row['grad_input_speedup']:.2f}x  grad_weight {row['grad_weight_speedup']:.2f}x  "
                  f"fwd+bwd {row['fwd_bwd_speedup']:.2f}x", flush=True)
            write(ARGS.out, "gpu_layers", summarize(rows), rows, rows_table(rows), NOTES)  # after every row
    return 0


def summarize(rows) -> dict:
    def gmean(vals):
        vals = [v for v in vals if v > 0]
        return float(torch.tensor(vals).log().mean().exp()) if vals else float("nan")

    metrics = {"cusparselt_plans": cusparselt_plans.status()}
    models = [r for r in rows if not r["layer"].startswith("sweep")]
    big = [r for r in rows if r["layer"].startswith("sweep") and r["in"] >= 4096]
    for p in ("output", "grad_input", "grad_weight", "fwd_bwd"):
        metrics[f"{p}_speedup_gmean_model_shapes"] = gmean([r[f"{p}_speedup"] for r in models])
        metrics[f"{p}_speedup_gmean_sweep_h_ge_4096"] = gmean([r[f"{p}_speedup"] for r in big])
    gains = [r[f"{p}_plan_gain"] for r in rows for p in ("output", "grad_input") if f"{p}_plan_gain" in r]
    if gains:
        metrics["plan_gain_gmean"] = gmean(gains)  # torch's per-call time / the library's time, sparse products
    llama = [r for r in rows if r["layer"].startswith("llama3-8b") and r["tokens"] == 8192]
    if llama:
        metrics["llama3_8b_fwd_bwd_speedup_T8192"] = gmean([r["fwd_bwd_speedup"] for r in llama])
    return metrics


def rows_table(rows) -> str:
    cols = ["layer", "shape", "tokens", "output_speedup", "grad_input_speedup", "grad_weight_speedup",
            "fwd_bwd_speedup", "kernel_output", "kernel_grad_input", "output_dense_ms", "output_slope_ms",
            "output_torch_call_ms", "output_plan_gain", "grad_input_plan_gain", "refresh_output_inplace_ms",
            "recompress_grad_input_ms", "column_mask_refresh_ms"]
    return md_table(rows, cols)


NOTES = """Speedup = dense time / SLoPe time, bf16, both measured in this run on the same GPU.
SLoPe's grad_weight is the same dense product plus the gather of the kept entries, so its ratio is
at most 1. Refresh costs are per optimizer step (in place) or per re-compression / column-mask
refresh (every `backward_mask_interval` steps), measured once per shape. plan_gain = time of the
same sparse product through torch._cslt_sparse_mm (plan rebuilt per call) / the library's time."""

ARGS = None

if __name__ == "__main__":
    sys.exit(main())
