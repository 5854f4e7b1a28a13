"""PNG of per-product speedup (dense time / SLoPe time) vs hidden size from gpu_layers.json.

    python benchmarks/gpu_plot.py DIR/gpu_layers.json DIR/gpu_speedup.png

The paper's A100 figures are drawn as the range its text states (per-product speedups of
1.4-1.9x from hidden size 4096 up, break-even near 2-2.5k), not as digitised points.
Draws whatever rows gpu_layers.json holds (a run cut short by its time limit has fewer); exits 1
with one line when it has no sweep row at all.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: str, dst: str) -> int:
    with open(src) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["layer"].startswith("sweep")]
    if not rows:
        print(f"gpu_plot: {src} has no hidden-size sweep row; nothing to plot")
        return 1
    tokens = sorted({r["tokens"] for r in rows})
    products = ["output", "grad_input", "fwd_bwd"]
    fig, axes = plt.subplots(1, len(products), figsize=(5 * len(products), 4), sharey=True)
    for ax, product in zip(axes, products, strict=True):
        for t in tokens:
            pts = sorted((r["in"], r[f"{product}_speedup"]) for r in rows if r["tokens"] == t)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{t} tokens")
        ax.fill_between([4096, 16384], 1.4, 1.9, color="grey", alpha=0.2,
                        label="paper A100, range in its text (hidden >= 4096)")
        ax.axvspan(2048, 2560, color="orange", alpha=0.15, label="paper A100 break-even (2-2.5k)")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden size h (layer h x h)")
        ax.set_title(product.replace("fwd_bwd", "fwd+bwd (3 products)"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup over dense bf16 (x)")
    axes[0].legend(fontsize=7)
    hw = data["hardware"].get("gpu") or data["hardware"].get("device", "GPU")  # "cpu" in the rehearsal
    fig.suptitle(f"SLoPe 2:4 products vs dense, {hw}, torch {data['versions']['torch']}, "
                 f"cuSPARSELt {data['versions'].get('cusparselt')}")
    fig.tight_layout()
    fig.savefig(dst, dpi=110, metadata={"Software": None})  # no tool banner in the file
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/gpu_plot.py DIR/gpu_layers.json DIR/gpu_speedup.png")
    sys.exit(main(*sys.argv[1:3]))
