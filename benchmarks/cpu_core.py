"""SLoPe vs dense on CPU: training-step time and training-state memory of a ≈8.9M LLaMA-style model.

    python benchmarks/cpu_core.py [--rounds 7] [--steps 6]

(a) Step time: dense and SLoPe 2:4 models are trained side by side in one process, alternating
    rounds so that load from other processes hits both alike; each round times `--steps` steps after
    one warm-up step. Reported: medians over all timed steps and their ratio.
(b) Training-state memory of the sparsified layers: parameters + gradients + AdamW state + every
    persistent buffer and any tensor a layer keeps between steps (its caches), counted on live
    objects after real steps; and the peak resident memory of one training step of the whole model,
    each measured in a fresh child process (Linux VmHWM, reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import slope
from benchmarks import _report

BATCH, SEQ = 8, 256


def model_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
    )


def build(method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config())
    if method == "slope":
        slope.sparsify(model)
    return model, slope.track_steps(torch.optim.AdamW(model.parameters(), lr=1e-3))


def step(model, opt, batch) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    opt.zero_grad()


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors_in(obj, depth: int = 0):
    """Tensors reachable from a layer's attributes through dicts, lists, tuples and plain objects."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors_in(value, depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors_in(value, depth + 1)
    elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        yield from _tensors_in(vars(obj), depth + 1)


def layer_state_bytes(layer: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Bytes a linear layer holds between steps, by category (gradients counted as allocated)."""
    params = list(layer.parameters(recurse=False))
    counted = {id(p) for p in params} | {id(b) for b in layer.buffers(recurse=False)}
    caches = sum(tensor_bytes(t) for t in _tensors_in(vars(layer)) if id(t) not in counted)
    return {
        "params": sum(tensor_bytes(p) for p in params),
        "grads": sum(tensor_bytes(p) for p in params),  # a grad is allocated like its parameter
        "optimizer": sum(tensor_bytes(s) for p in params for s in opt.state.get(p, {}).values()),
        "buffers": sum(tensor_bytes(b) for b in layer.buffers(recurse=False)),
        "caches": caches,
    }


def measure_state(batch) -> dict:
    sparse_model, sparse_opt = build("slope")
    dense_model, dense_opt = build("dense")
    for _ in range(2):
        step(sparse_model, sparse_opt, batch)
        step(dense_model, dense_opt, batch)
    names = [name for name, _ in slope.slope_layers(sparse_model)]
    totals = {"slope": dict.fromkeys(["params", "grads", "optimizer", "buffers", "caches"], 0)}
    totals["dense"] = dict(totals["slope"])
    for name in names:
        for method, model, opt in (("slope", sparse_model, sparse_opt), ("dense", dense_model, dense_opt)):
            for key, value in layer_state_bytes(model.get_submodule(name), opt).items():
                totals[method][key] += value
    weights = sum(dense_model.get_submodule(name).weight.numel() for name in names)
    return {"layers": len(names), "dense_weights": weights, **totals}


def peak_step_child(method: str) -> None:
    """Run in a fresh process: print the peak RSS growth of one training step, in bytes."""
    torch.manual_seed(0)
    model, opt = build(method)
    batch = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    for _ in range(2):  # allocate grads and optimizer state before measuring
        step(model, opt, batch)
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set size
    step(model, opt, batch)
    print(json.dumps({"peak_step_bytes": (_status_kib("VmHWM") - rss_before) * 1024, "rss_bytes": rss_before * 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peaks(repeats: int) -> dict:
    peaks = {"dense": [], "slope": []}
    for _ in range(repeats):
        for method in ("dense", "slope"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.cpu_core", "--peak-child", method],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            peaks[method].append(json.loads(out)["peak_step_bytes"])
    return {method: _report.median(values) for method, values in peaks.items()}


def measure_time(rounds: int, steps: int, batch) -> dict:
    models = {method: build(method) for method in ("dense", "slope")}
    times = {"dense": [], "slope": []}
    for r in range(rounds):
        order = ("dense", "slope") if r % 2 == 0 else ("slope", "dense")
        for method in order:
            model, opt = models[method]
            step(model, opt, batch)  # warm-up: caches, allocator
            for _ in range(steps):
                start = time.perf_counter()
                step(model, opt, batch)
                times[method].append(time.perf_counter() - start)
        print(f"round {r + 1}/{rounds}: dense {_report.median(times['dense']):.3f}s  "
              f"slope {_report.median(times['slope']):.3f}s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-repeats", type=int, default=3)
    parser.add_argument("--peak-child", choices=["dense", "slope"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        peak_step_child(args.peak_child)
        return

    batch = torch.randint(0, 8192, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    times = measure_time(args.rounds, args.steps, batch)
    state = measure_state(batch)
    peaks = measure_peaks(args.peak_repeats)

    dense_t, slope_t = _report.median(times["dense"]), _report.median(times["slope"])
    state_total = {method: sum(state[method].values()) for method in ("dense", "slope")}
    metrics = {
        "step_time_dense_s": dense_t,
        "step_time_slope_s": slope_t,
        "step_time_ratio_slope_over_dense": slope_t / dense_t,
        "tokens_per_s_dense": BATCH * SEQ / dense_t,
        "tokens_per_s_slope": BATCH * SEQ / slope_t,
        "train_state_bytes_dense": state_total["dense"],
        "train_state_bytes_slope": state_total["slope"],
        "train_state_bytes_ratio": state_total["slope"] / state_total["dense"],
        "train_state_bytes_per_weight_slope": state_total["slope"] / state["dense_weights"],
        "peak_step_bytes_dense": peaks["dense"],
        "peak_step_bytes_slope": peaks["slope"],
        "peak_step_bytes_ratio": peaks["slope"] / peaks["dense"],
    }
    rows = [
        {"method": method, "step_time_median_s": _report.median(times[method]), "step_times_s": times[method],
         **{f"state_{k}_bytes": v for k, v in state[method].items()}, "peak_step_bytes": peaks[method]}
        for method in ("dense", "slope")
    ]
    mib = 2**20
    table = "\n".join([
        f"Model: LLaMA-style, {sum(p.numel() for p in build('dense')[0].parameters()):,} parameters, batch "
        f"{BATCH}x{SEQ}; {state['layers']} sparsified layers holding {state['dense_weights']:,} dense weights.",
        "",
        "| | dense | SLoPe 2:4 | ratio |",
        "|---|---|---|---|",
        f"| step time (median of {len(times['dense'])}) | {dense_t:.3f} s | {slope_t:.3f} s | {slope_t / dense_t:.3f} |",
        *[f"| {k} (sparsified layers) | {state['dense'][k] / mib:.2f} MiB | {state['slope'][k] / mib:.2f} MiB | "
          f"{state['slope'][k] / state['dense'][k]:.3f} |" if state["dense"][k] else
          f"| {k} (sparsified layers) | 0 | {state['slope'][k] / mib:.2f} MiB | - |" for k in state["dense"]],
        f"| training state total | {state_total['dense'] / mib:.2f} MiB | {state_total['slope'] / mib:.2f} MiB | "
        f"{state_total['slope'] / state_total['dense']:.3f} |",
        f"| peak RSS growth of one step, whole model (median of {args.peak_repeats}) | {peaks['dense'] / mib:.1f} MiB | "
        f"{peaks['slope'] / mib:.1f} MiB | {peaks['slope'] / peaks['dense']:.3f} |",
    ])
    path = _report.write("cpu_core_llama8m", metrics, rows, table)
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
