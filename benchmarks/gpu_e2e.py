"""End to end on one GPU: training step and inference prefill of LLaMA-style models, dense vs SLoPe.

    python benchmarks/gpu_e2e.py --out DIR [--widths 1b 3b 8b] [--layers 4] [--variants dense,slope]
    python benchmarks/gpu_e2e.py --out DIR --device cpu --widths tiny --layers 1 --seq 64 --steps 1   # rehearsal

Models are LLaMA-style (HF LlamaForCausalLM, random init) at the widths of LLaMA-3.2-1B, -3B and
LLaMA-3-8B with only a few blocks so they fit a short run; vocabulary 8192 so that the dense
embeddings and LM head (never sparsified) do not dilute the blocks' share of the time.
Variants: dense; SLoPe 2:4 without adapters; with adapters of rank 1.5625 % and 6.25 % of the
hidden size. Training: fp32 master weights, bf16 autocast, fused AdamW, one step = forward,
backward, optimizer step. Inference: bf16 weights, prefill (one forward without KV cache).
The first linear layers after the input are sparsified too here (keep_first_linear_dense=False):
with a few blocks they would be a large share, with 32 blocks a small one.
Rows run most important first (training dense and SLoPe, prefill dense and SLoPe, then the adapter
variants), and gpu_e2e.json/.md in DIR are rewritten after each, so a run cut short keeps them.

Kernel tuning: every layer shape is tuned at the training token count, prefill's layers too (its
bucket would otherwise be another search per shape, tens of seconds of a short GPU loan each); the
prefill rows' dense-fallback decisions therefore use the speedups measured at the training count.
With --device cpu the model is tiny and runs fp32 on the emulated 2:4 library: a rehearsal of the
command and its result files, whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as bench
from gpu_common import md_table, ratio, time_ms, write

import slope
from slope.backends import backend_summary, cusparselt_plans
from slope.backends.select import SELECTOR, token_bucket
from slope.backends.semistructured import SemiStructuredBackend
from slope.memory import state_bytes

WIDTHS = {  # hidden, intermediate, heads, kv heads
    "tiny": (64, 128, 4, 2),  # the CPU rehearsal: every layer a multiple of 16 (the 2:4 operands' rule)
    "1b": (2048, 8192, 32, 8),
    "3b": (3072, 8192, 24, 8),
    "8b": (4096, 14336, 32, 8),
}
VARIANTS = {"dense": None, "slope": 0.0, "slope_r1.56%": 1 / 64, "slope_r6.25%": 1 / 16}
# (mode, variant) in the order they run: the headline comparisons first, so a run stopped by its
# time limit has them; each mode's dense row comes before the variants compared with it.
ORDER = [("train", "dense"), ("train", "slope"), ("prefill", "dense"), ("prefill", "slope"),
         ("train", "slope_r1.56%"), ("prefill", "slope_r1.56%"), ("train", "slope_r6.25%"),
         ("prefill", "slope_r6.25%")]


def build(width: str, layers: int, variant: str, dtype=torch.float32):
    hidden, inter, heads, kv = WIDTHS[width]
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    torch.manual_seed(0)
    with bench.DEVICE:
        model = LlamaForCausalLM(cfg)
    rank_ratio = VARIANTS[variant]
    if rank_ratio is not None:
        slope.sparsify(model, slope.SlopeConfig(keep_first_linear_dense=False, backward_mask_interval=ARGS.interval,
                                                backend=ARGS.backend))
        if rank_ratio > 0:
            slope.add_adapters(model, rank=max(1, round(rank_ratio * hidden)))
            for _, layer in slope.slope_layers(model):
                torch.nn.init.normal_(layer.adapter_b, std=0.01)  # non-zero, as later in training
    return model.to(dtype)


def free(*objs):
    del objs
    gc.collect()
    bench.empty_cache()


def tune_at_training_tokens(tokens: int) -> None:
    """Have every layer set-up of this process tune at the training token bucket, prefill's too.

    The process-wide selector asks its tuner at the layer's own bucket; prefill (more tokens per
    forward) would start one more kernel search per shape. The measurement at the training bucket is
    already in the tuning cache by then, so prefill starts none.
    """
    measure, bucket = SELECTOR.measure, token_bucket(tokens)
    SELECTOR.measure = lambda backend, device, _tokens, **kw: measure(backend, device, bucket, **kw)


def train_row(width, layers, variant, batch, seq) -> dict:
    bench.reset_peak_memory()
    base = bench.allocated_bytes()
    model = build(width, layers, variant)
    opt = slope.track_steps(torch.optim.AdamW(model.parameters(), lr=1e-5, fused=bench.DEVICE.type == "cuda"))
    ids = torch.randint(0, 8192, (batch, seq), device=bench.DEVICE)

    def step():
        with bench.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = time_ms(step, warmup=3, reps=ARGS.steps)
    row = {"width": width, "variant": variant, "mode": "train", "tokens": batch * seq, "ms": ms,
           "tokens_per_s": batch * seq / ms * 1e3,
           "peak_gib": (bench.allocated_bytes(peak=True) - base) / 2**30,
           "state_gib": (bench.allocated_bytes() - base) / 2**30}
    # what that state is, by kind (gradients are freed by zero_grad(set_to_none=True) between steps)
    for kind, nbytes in state_bytes(model, opt).items():
        if kind != "grads":
            row[f"state_{kind}_gib"] = nbytes / 2**30
    if variant != "dense":
        row["backends"] = backend_summary(slope.slope_layers(model))
    free(model, opt)
    return row


def infer_row(width, layers, variant, batch, seq) -> dict:
    bench.reset_peak_memory()
    base = bench.allocated_bytes()
    model = build(width, layers, variant, dtype=bench.compute_dtype()).eval()
    ids = torch.randint(0, 8192, (batch, seq), device=bench.DEVICE)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    prefill()  # set-up: compression, per-shape measurement and numerics check, fused-path choice
    weights = (bench.allocated_bytes() - base) / 2**30
    bench.reset_peak_memory()
    ms = time_ms(prefill, warmup=2, reps=ARGS.steps)
    row = {"width": width, "variant": variant, "mode": "prefill", "tokens": batch * seq, "ms": ms,
           "tokens_per_s": batch * seq / ms * 1e3,
           "peak_gib": (bench.allocated_bytes(peak=True) - base) / 2**30, "state_gib": weights}
    if variant != "dense":
        row["backends"] = backend_summary(slope.slope_layers(model))
        fused = {placement.backend.plan.fused_inference for _, layer in slope.slope_layers(model)
                 for placement in layer.runtime.placements() if isinstance(placement.backend, SemiStructuredBackend)}
        row["fused_adapter_path"] = ",".join(sorted(str(f) for f in fused))
    free(model)
    return row


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--widths", nargs="+", default=["1b", "8b"], choices=sorted(WIDTHS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--variants", type=_variants, default=list(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (3 rounds)")
    p.add_argument("--interval", type=int, default=100, help="backward_mask_interval (paper's fast code: 100)")
    bench.add_device_args(p)
    ARGS = p.parse_args(argv)
    bench.use_device(ARGS.device)
    ARGS.backend = "auto" if bench.DEVICE.type == "cuda" else bench.library_name()
    tune_at_training_tokens(ARGS.train_batch * ARGS.seq)
    rows = []
    modes = {"train": (train_row, ARGS.train_batch), "prefill": (infer_row, ARGS.prefill_batch)}
    for width in ARGS.widths:
        dense = {}
        for mode, variant in ORDER:
            if variant not in ARGS.variants:
                continue
            fn, batch = modes[mode]
            row = fn(width, ARGS.layers, variant, batch, ARGS.seq)
            dense.setdefault(mode, row if variant == "dense" else None)
            base = dense[mode] or {}
            row["speedup_vs_dense"] = ratio(base.get("ms", 0.0), row["ms"])
            row["peak_memory_ratio"] = ratio(row["peak_gib"], base.get("peak_gib", 0.0))
            row["state_memory_ratio"] = ratio(row["state_gib"], base.get("state_gib", 0.0))
            rows.append(row)
            print(f"{width} {mode:7s} {variant:13s} {row['ms']:8.2f} ms  {row['tokens_per_s']:10.0f} tok/s  "
                  f"x{row['speedup_vs_dense']:.3f}  peak {row['peak_gib']:.2f} GiB "
                  f"(x{row['peak_memory_ratio']:.3f})  {row.get('backends', '')}", flush=True)
            write(ARGS.out, "gpu_e2e", metrics(rows), rows, md_table(rows, COLUMNS), NOTES)  # after every row
    return 0


def _variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(VARIANTS)}")
    return names


def metrics(rows) -> dict:
    out = {"cusparselt_plans": cusparselt_plans.status()}
    for r in rows:
        if r["variant"] != "dense":
            key = f"{r['mode']}_{r['width']}_{r['variant']}"
            out[f"{key}_speedup"] = r["speedup_vs_dense"]
            out[f"{key}_peak_memory_ratio"] = r["peak_memory_ratio"]
    return out


COLUMNS = ["width", "mode", "variant", "tokens", "ms", "tokens_per_s", "speedup_vs_dense", "peak_gib",
           "peak_memory_ratio", "state_gib", "state_memory_ratio", "state_weights_gib", "state_optimizer_gib",
           "state_buffers_gib", "state_caches_gib", "fused_adapter_path"]
NOTES = """speedup_vs_dense = dense step time / variant step time (same run, same GPU). Memory: peak
allocated during the timed steps (train: includes weights, gradients, AdamW state, activations) and
state = allocated after the steps (train) or after set-up (prefill: weights and compressed operands).
state_*_gib break the training state down by kind (slope.memory.state_bytes): weights, AdamW state,
buffers (packed masks) and caches (compressed operands, index maps kept between steps).
Kernels are tuned at the training token count for every row, prefill's too (see the module docstring)."""

ARGS = None

if __name__ == "__main__":
    sys.exit(main())
