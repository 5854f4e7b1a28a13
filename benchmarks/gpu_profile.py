"""Where every millisecond of a training step goes on the GPU, dense vs SLoPe, and the bound it is held to.

    python benchmarks/gpu_profile.py --out DIR [--width 8b] [--layers 2] [--tokens 8192]
    python benchmarks/gpu_profile.py --out DIR --device cpu --width tiny --layers 1 --tokens 128   # rehearsal

One LLaMA-style model at LLaMA-3-8B width (a few blocks, vocabulary 8192), trained one step at a
time with bf16 autocast and fused AdamW, dense and SLoPe (2:4, no adapters) in the same run:

1. a per-category table of device time per step, from the profiler's kernel events: sparse GEMM,
   dense GEMM, SLoPe bookkeeping (gather/scatter/index/compression/fused step kernels), other
   element-wise, attention, norms/activations, optimizer, and GPU idle (step time minus the kernels);
2. next to it the Amdahl bound: the step time SLoPe would reach if only its sparse products changed,
   from this run's own measurements: the dense step time, the dense time of every block layer's
   output and grad_input products at this token count, and the raw speedups tuning measured for
   them (grad_weight stays dense in SLoPe, so it is not in the sped-up share):

       bound = step_dense / (step_dense - L_dense + L_sparse),
       L_dense = sum over layers of t_output + t_grad_input (dense),
       L_sparse = sum over layers of t_output / s_output + t_grad_input / s_grad_input;

3. the achieved ratio (dense step time / SLoPe step time) and achieved / bound.

Writes gpu_profile.json/.md into DIR (the common result schema, see gpu_common.write), rewritten
after each measurement (the dense step, the SLoPe step, each layer shape's products), so a run
stopped by its time limit keeps what it finished. With --device cpu: a tiny model on the emulated
2:4 library and the profiler's CPU events (no kernel is a CUDA one, so every category is 0): a
rehearsal of the command and its result files.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as bench
from gpu_common import md_table, time_ms, write

CATEGORIES = ("sparse GEMM", "dense GEMM", "SLoPe bookkeeping", "attention", "norms/activations", "optimizer",
              "other element-wise")
# Lower-case substrings of kernel names, tried in this order (the first match wins): a sparse GEMM's
# name also contains "gemm", an optimizer's "multi_tensor" kernel is element-wise too.
_RULES = (
    ("sparse GEMM", ("cusparselt", "sparse_gemm", "spmma", "xmma_sparse", "sm90_sparse", "sparse")),
    ("optimizer", ("adam", "multi_tensor_apply", "fused_optim")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("dense GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_")),
    ("SLoPe bookkeeping", ("gather", "scatter", "index", "compress", "refresh_operands", "compact_grad",
                           "column_refresh", "nonzero", "masked")),
    ("norms/activations", ("norm", "rms", "silu", "swish", "gelu", "softmax", "act_and_mul")),
)


def categorize(kernel_name: str) -> str:
    """The category of one GPU kernel, by its name (see _RULES)."""
    name = kernel_name.lower()
    for category, needles in _RULES:
        if any(needle in name for needle in needles):
            return category
    return "other element-wise"


def amdahl_bound(step_dense_ms: float, products: list[dict]) -> float:
    """The dense/SLoPe step-time ratio if only the sparse products changed (see module docstring).

    products: per block layer, {"output_ms", "grad_input_ms"} (dense) and {"output_x", "grad_input_x"}
    (sparse speedups over dense).
    """
    l_dense = sum(p["output_ms"] + p["grad_input_ms"] for p in products)
    l_sparse = sum(p["output_ms"] / p["output_x"] + p["grad_input_ms"] / p["grad_input_x"] for p in products)
    return step_dense_ms / (step_dense_ms - l_dense + l_sparse)


def per_category(events, step_ms: float, steps: int) -> dict[str, float]:
    """ms per step by category from the profiler's device-side kernel events, plus "GPU idle"."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        totals[categorize(event.name)] += event.time_range.elapsed_us() / 1e3 / steps  # µs -> ms, per step
    totals["GPU idle"] = max(0.0, step_ms - sum(totals.values()))
    return totals


# ---- on the GPU -------------------------------------------------------------------------------------

# hidden, intermediate, heads, kv heads; "tiny" is the CPU rehearsal's (every layer a multiple of 16)
WIDTHS = {"tiny": (64, 128, 4, 2), "1b": (2048, 8192, 32, 8), "8b": (4096, 14336, 32, 8)}
SEQ = 2048  # tokens per sequence; a step is tokens // SEQ sequences


def build(width: str, layers: int, sparse: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    import slope

    hidden, inter, heads, kv = WIDTHS[width]
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192)
    torch.manual_seed(0)
    with bench.DEVICE:
        model = LlamaForCausalLM(cfg)
    if sparse:
        backend = "auto" if bench.DEVICE.type == "cuda" else bench.library_name()
        slope.sparsify(model, slope.SlopeConfig(keep_first_linear_dense=False, backward_mask_interval=100,
                                                backend=backend))
    return model


def train_step_fn(model, tokens: int):
    from slope.linear import track_steps

    opt = track_steps(torch.optim.AdamW(model.parameters(), lr=1e-5, fused=bench.DEVICE.type == "cuda"))
    seq = min(SEQ, tokens)
    ids = torch.randint(0, 8192, (max(1, tokens // seq), seq), device=bench.DEVICE)

    def step():
        with bench.autocast():
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile(step, steps: int = 3) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if bench.DEVICE.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    bench.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        bench.synchronize()
    return list(prof.events())


def block_products(model, tokens: int, rows: list[dict] | None = None, after_shape=lambda: None) -> list[dict]:
    """Dense times and tuned sparse speedups of both products of every block linear layer.

    rows: the list to append the rows to (default a new one); `after_shape()` is called after each
    new layer shape is measured, with its rows in `rows` (to save partial results).
    """
    from slope.backends.numerics import layout_check
    from slope.backends.select import SELECTOR
    from slope.backends.semistructured import ProductPlan, SemiStructuredBackend
    from slope.backends.sparselib import LIBRARIES
    from slope.convert import slope_layers

    dev, dtype, lib = bench.DEVICE, bench.compute_dtype(), LIBRARIES[bench.library_name()]
    measured: dict[tuple, dict] = {}
    rows = [] if rows is None else rows
    for name, layer in slope_layers(model):
        shape = (layer.out_features, layer.in_features)
        new = shape not in measured
        if new:
            be = SemiStructuredBackend(lib, dtype, shape, ProductPlan(), inplace=layout_check(lib, dev, dtype))
            found = SELECTOR.measure(be, dev, tokens)  # the tuner training uses: cached, searched in a child
            w = torch.randn(shape, device=dev, dtype=dtype)
            x = torch.randn(tokens, shape[1], device=dev, dtype=dtype)
            dy = torch.randn(tokens, shape[0], device=dev, dtype=dtype)
            measured[shape] = {"output_ms": time_ms(lambda x=x, w=w: x @ w.t()),
                               "grad_input_ms": time_ms(lambda dy=dy, w=w: dy @ w),
                               "output_x": found.speedup["output"], "grad_input_x": found.speedup["grad_input"]}
        rows.append({"layer": name, "shape": f"{shape[0]}x{shape[1]}", **measured[shape]})
        if new:
            after_shape()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_run"))
    p.add_argument("--width", choices=sorted(WIDTHS), default="8b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8192)
    bench.add_device_args(p)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_profile: needs a CUDA GPU (none found); nothing measured (--device cpu rehearses it)")
        return 2
    bench.use_device(args.device)

    results, step_ms, products = {}, {}, []

    def save() -> None:
        """The result so far: every category of the steps measured, the bound once both are."""
        write(args.out, "gpu_profile", summary(args, step_ms, products), table_rows(results, step_ms),
              md_table(table_rows(results, step_ms), TABLE), notes(products))

    for variant in ("dense", "slope"):
        model = build(args.width, args.layers, sparse=variant == "slope")
        step = train_step_fn(model, args.tokens)
        for _ in range(3):
            step()  # warm-up: set-up, tuning, allocator
        step_ms[variant] = statistics.median(time_ms(step, warmup=0, reps=1) for _ in range(5))
        results[variant] = per_category(profile(step), step_ms[variant], steps=3)
        save()
        if variant == "slope":
            block_products(model, args.tokens, rows=products, after_shape=save)
        del model, step
        bench.empty_cache()

    print(md_table(table_rows(results, step_ms), TABLE))
    metrics = summary(args, step_ms, products)
    print(f"training x{metrics['train_speedup']:.3f} of dense; Amdahl bound x{metrics['amdahl_bound']:.3f}; "
          f"achieved / bound {metrics['achieved_over_bound']:.3f}")
    return 0


TABLE = ["category", "dense_ms", "slope_ms", "slope_minus_dense_ms"]


def table_rows(results: dict, step_ms: dict) -> list[dict]:
    """One row per category and one for the step; a variant not measured yet is left blank."""
    def row(category, dense, slope):
        out = {"category": category}
        if dense is not None:
            out["dense_ms"] = dense
        if slope is not None:
            out["slope_ms"] = slope
        if dense is not None and slope is not None:
            out["slope_minus_dense_ms"] = slope - dense
        return out

    rows = [row(c, results.get("dense", {}).get(c), results.get("slope", {}).get(c)) for c in (*CATEGORIES, "GPU idle")]
    rows.append(row("step (median of 5)", step_ms.get("dense"), step_ms.get("slope")))
    return rows


def summary(args, step_ms: dict, products: list[dict]) -> dict:
    """The headline metrics available so far (the bound needs both steps and the products)."""
    metrics = {"width": args.width, "layers": args.layers, "tokens": args.tokens}
    if "dense" in step_ms and "slope" in step_ms:
        metrics["train_speedup"] = step_ms["dense"] / step_ms["slope"]
    if "dense" in step_ms and products:
        bound = amdahl_bound(step_ms["dense"], products)
        l_dense = sum(r["output_ms"] + r["grad_input_ms"] for r in products)
        metrics["amdahl_bound"] = bound
        metrics["linear_share_of_dense_step"] = l_dense / step_ms["dense"]
        if "train_speedup" in metrics:
            metrics["achieved_over_bound"] = metrics["train_speedup"] / bound
    return metrics


def notes(products: list[dict]) -> str:
    return ("Categories come from kernel names (benchmarks/gpu_profile.py `_RULES`); GPU idle is the step "
            "time minus the kernels' device time. The bound assumes only the output and grad_input "
            "products change, at the raw speedups tuning measured for each shape in this run.\n\n"
            + md_table(products, ["layer", "shape", "output_ms", "grad_input_ms", "output_x", "grad_input_x"]))


if __name__ == "__main__":
    sys.exit(main())
