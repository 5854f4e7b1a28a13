"""Where SLoPe's time goes on the GPU: the kernels tuned per shape, one layer in isolation (SLoPe vs
nn.Linear, prefill and a training fwd+bwd), and profiler tables of a small LLaMA-style model.

    python benchmarks/gpu_profile.py [--skip-model]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import time_ms

import slope
from slope.backends import backend_summary
from slope.backends.numerics import layout_check
from slope.backends.select import measure_products
from slope.backends.semistructured import ProductPlan, SemiStructuredBackend
from slope.backends.sparselib import CUSPARSELT


def tuned_kernels():
    for shape in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        for tokens in (2048, 16384):
            dev, dtype = torch.device("cuda"), torch.bfloat16
            be = SemiStructuredBackend(CUSPARSELT, dtype, shape, ProductPlan(), inplace=layout_check(CUSPARSELT, dev, dtype))
            r = measure_products(be, dev, tokens)
            print(f"tuned {shape} T={tokens}: output {r.speedup['output']:.2f}x {r.kernel['output']}  "
                  f"grad_input {r.speedup['grad_input']:.2f}x {r.kernel['grad_input']}", flush=True)


def one_layer(out_f, in_f, tokens=16384):
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=False, device="cuda")
    layer = slope.SlopeLinear.from_dense(dense, slope.SlopeConfig())
    x = torch.randn(tokens, in_f, device="cuda")
    res = {}
    for name, mod in (("dense", dense), ("slope", layer)):
        xr = x.clone().requires_grad_(True)

        def train(m=mod, xr=xr):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                m(xr).sum().backward()
            with torch.no_grad():
                m.weight.add_(0.0)  # stands in for an optimizer step: the values' version moves

        res[f"train_{name}"] = time_ms(train)
    for name, mod in (("dense", dense), ("slope", layer)):
        mod.to(torch.bfloat16)
        xb = x.bfloat16()
        with torch.no_grad():
            res[f"prefill_{name}"] = time_ms(lambda m=mod, xb=xb: m(xb))
    print(f"one layer {out_f}x{in_f} T={tokens}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items())
          + f"  | train x{res['train_dense'] / res['train_slope']:.2f}, prefill x{res['prefill_dense'] / res['prefill_slope']:.2f}")
    print("   ", backend_summary([layer]), flush=True)


def table(prof, title):
    print(f"--- {title} ---")
    for key in ("device_time_total", "cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=16, max_name_column_width=70))
            return
        except (AttributeError, KeyError, RuntimeError, ValueError) as err:
            print(f"sort by {key} failed: {err}")


def model_profile():
    cfg = LlamaConfig(vocab_size=8192, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    slope.sparsify(model, slope.SlopeConfig(keep_first_linear_dense=False, backward_mask_interval=100))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, 8192, (4, 2048), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    table(prof, "SLoPe train step, 2 blocks at 8B width, 8192 tokens")
    print(backend_summary(slope.slope_layers(model)))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args()
    tuned_kernels()
    one_layer(14336, 4096)
    one_layer(4096, 4096)
    one_layer(4096, 4096, tokens=4096)
    if not args.skip_model:
        model_profile()
