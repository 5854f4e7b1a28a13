"""Size of a compressed SLoPe export against a dense fp16 Hugging Face model of the same weights.

Prints, per model: the stored bytes of the sparsified layers (kept values + bit-packed positions)
over their dense fp16 bytes, and the whole model.safetensors file ratio (embeddings, LM head and
the layers kept dense stay dense). Writes benchmarks/results/export_size.{json,md}.

    python benchmarks/export_size.py            # the three models below, a minute on 2 CPU cores
    python benchmarks/export_size.py --quick    # the small model only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

import slope
from slope.io.export import save_compressed, save_dense
from slope.io.format import EXPORT_WEIGHTS_FILE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # benchmarks/ is not a package: found through the path entry above


def _configs():
    from transformers import GPT2Config, LlamaConfig

    return {
        "llama-h256-l4-v8k": LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        ),
        "llama-h1024-l8-v32k": LlamaConfig(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
            num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1024,
        ),
        "gpt2-small-124M": GPT2Config(),  # 768 hidden, 12 layers, 50257 vocab, tied head
    }


def measure(name: str, config, adapters: bool, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    params = sum(p.numel() for p in model.parameters())
    slope.sparsify(model, slope.SlopeConfig(n=2, m=4, backend="reference"))
    if adapters:
        slope.add_adapters(model)  # rank = 1/64 of the smaller side (the default ratio)
    tag = f"{name}{'-adapters' if adapters else ''}"
    compressed = save_compressed(model, work / f"{tag}-slope", dtype=torch.float16)
    dense = save_dense(model, work / f"{tag}-dense", dtype=torch.float16)

    layers = slope.slope_layers(model)
    with safe_open(compressed / EXPORT_WEIGHTS_FILE, framework="pt") as f:
        stored = sum(
            f.get_tensor(f"{n}.{part}").nbytes
            for n, _ in layers for part in ("values", "positions")
        )
        adapter_bytes = sum(
            f.get_tensor(f"{n}.{part}").nbytes for n, layer in layers if layer.rank for part in ("adapter_a", "adapter_b")
        )
    dense_layer_bytes = sum(layer.out_features * layer.in_features * 2 for _, layer in layers)
    compressed_file = (compressed / EXPORT_WEIGHTS_FILE).stat().st_size
    dense_file = (dense / "model.safetensors").stat().st_size
    row = {
        "model": name,
        "adapters": adapters,
        "params": params,
        "sparse_layers": len(layers),
        "sparse_layer_bytes_dense_fp16": dense_layer_bytes,
        "sparse_layer_bytes_stored": stored,
        "sparse_layers_ratio": stored / dense_layer_bytes,
        "adapter_bytes": adapter_bytes,
        "file_bytes_dense_fp16": dense_file,
        "file_bytes_compressed": compressed_file,
        "whole_model_ratio": compressed_file / dense_file,
    }
    print(
        f"{tag:32s} sparse layers {row['sparse_layers_ratio']:.4f}x  whole model {row['whole_model_ratio']:.4f}x "
        f"({compressed_file / 1e6:.1f} MB vs {dense_file / 1e6:.1f} MB)"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the small model")
    parser.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args()
    configs = _configs()
    names = list(configs)[:1] if args.quick else list(configs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for adapters in (False, True):
                rows.append(measure(name, configs[name], adapters, Path(tmp)))
    plain = [r for r in rows if not r["adapters"]]
    metrics = {
        "sparse_layers_bytes_ratio_fp16": max(r["sparse_layers_ratio"] for r in plain),
        **{f"whole_model_file_ratio_fp16[{r['model']}]": r["whole_model_ratio"] for r in plain},
        **{f"whole_model_file_ratio_fp16_adapters[{r['model']}]": r["whole_model_ratio"] for r in rows if r["adapters"]},
    }
    table = "\n".join(
        [
            "| model | adapters | params | sparse layers | sparse-layer ratio | whole-file ratio | compressed MB | dense fp16 MB |",
            "|---|---|---|---|---|---|---|---|",
            *[
                f"| {r['model']} | {'rank 1/64' if r['adapters'] else 'no'} | {r['params'] / 1e6:.1f}M | {r['sparse_layers']} "
                f"| {r['sparse_layers_ratio']:.4f} | {r['whole_model_ratio']:.4f} | {r['file_bytes_compressed'] / 1e6:.1f} "
                f"| {r['file_bytes_dense_fp16'] / 1e6:.1f} |"
                for r in rows
            ],
        ]
    )
    notes = (
        "2:4 in fp16: per group of 4 weights, 2 kept fp16 values (32 bits) + a 3-bit pattern code "
        "(one of C(4,2) = 6) = 35 of 64 bits, 0.547x. The whole-file ratio is higher because embeddings, "
        "the LM head and the first linear layers after the input stay dense (the paper keeps them dense; see docs/training.md)."
    )
    path = _report.write("export_size", metrics, rows, table, notes, out_dir=args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
