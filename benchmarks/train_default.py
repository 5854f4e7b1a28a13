"""The default `slope train` run, dense and SLoPe 2:4 side by side: held-out quality and speed.

    python benchmarks/train_default.py [--runs-dir runs/bench-train-default] [-- extra overrides]

Runs `slope train --method dense` and then `slope train --method slope` (the default run: ~8.4M
LLaMA-style model, 200 steps of 8 x 256 tokens on Shakespeare) as separate processes, one after the
other on the same machine, and reports each run's wall time, training tokens/s, and held-out
perplexity / bits-per-byte on Shakespeare-held-out and Milton, plus the slope/dense ratios.
Writes benchmarks/results/train_default.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _report

METHODS = ("dense", "slope")
SETS = ("shakespeare-heldout", "milton")


def run_one(method: str, run_dir: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "slope", "train", "--method", method, "--run-dir", str(run_dir),
               "--no-progress", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {"method": method, "wall_s": wall, "train_s": summary["train_seconds"],
           "tokens": summary["tokens"], "tokens_per_s": summary["tokens_per_s"],
           "params_stored": summary["parameters"]["stored"], "final_train_loss": summary["final_train_loss"]}
    for name in SETS:
        result = summary["eval"][name]
        row[f"{name}_loss"], row[f"{name}_ppl"], row[f"{name}_bpb"] = result["loss"], result["ppl"], result["bpb"]
        row[f"{name}_tokens"] = result["tokens"]
    return row


def _report_vocab(run_dir: Path) -> int:
    import tomllib

    return tomllib.loads((run_dir / "config.toml").read_text())["tokenizer"]["vocab_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / f"bench-train-default-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("extra", nargs="*", help="overrides passed to both runs, e.g. --train.max_steps=20")
    args = parser.parse_args()
    if args.runs_dir.exists():
        sys.exit(f"{args.runs_dir} exists; choose another --runs-dir")
    rows = [run_one(method, args.runs_dir / method, args.extra) for method in METHODS]
    dense, sparse = rows
    metrics = {
        "wall_s_dense": dense["wall_s"], "wall_s_slope": sparse["wall_s"],
        "tokens_per_s_dense": dense["tokens_per_s"], "tokens_per_s_slope": sparse["tokens_per_s"],
        "tokens_per_s_ratio_slope_over_dense": sparse["tokens_per_s"] / dense["tokens_per_s"],
        "params_stored_ratio_slope_over_dense": sparse["params_stored"] / dense["params_stored"],
    }
    for name in SETS:
        for key in ("ppl", "bpb"):
            metrics[f"{name}_{key}_dense"] = dense[f"{name}_{key}"]
            metrics[f"{name}_{key}_slope"] = sparse[f"{name}_{key}"]
        metrics[f"{name}_ppl_ratio_slope_over_dense"] = sparse[f"{name}_ppl"] / dense[f"{name}_ppl"]

    def line(label: str, key: str, fmt: str) -> str:
        d, s = dense[key], sparse[key]
        return f"| {label} | {d:{fmt}} | {s:{fmt}} | {s / d:.3f} |"

    table = "\n".join([
        "| default run (`slope train`) | dense | SLoPe 2:4 | SLoPe / dense |",
        "|---|---|---|---|",
        line("Shakespeare held-out perplexity", "shakespeare-heldout_ppl", ".2f"),
        line("Shakespeare held-out bits/byte", "shakespeare-heldout_bpb", ".4f"),
        line("Milton perplexity (out of domain)", "milton_ppl", ".2f"),
        line("Milton bits/byte", "milton_bpb", ".4f"),
        line("final training loss", "final_train_loss", ".4f"),
        line("training tokens/s", "tokens_per_s", ",.0f"),
        line("wall time of the whole command (s)", "wall_s", ".0f"),
        line("stored parameters", "params_stored", ",d"),
    ])
    vocab = _report_vocab(args.runs_dir / "dense")
    notes = (
        f"Each run trains on {dense['tokens']:,} tokens; perplexities are over "
        f"{dense['shakespeare-heldout_tokens']:,} evenly spaced tokens of each held-out set (tokenizer: byte-level "
        f"BPE, vocabulary {vocab}, trained on the training works only). Runs are separate processes, one after "
        "the other on the same machine, so load from other processes can shift the speeds. Run directories: "
        f"`{args.runs_dir}`."
    )
    path = _report.write("train_default", metrics, rows, table, notes)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
