"""The README.md every export writes: what the model is, how it was made sparse, and how to load it.

Plain documentation for whoever finds the folder (a hub page, a colleague): no reader depends on it.
The compressed export's checksums cover it like every other file, so an edited card is noticed too.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from slope.convert import slope_layers

README_FILE = "README.md"

_LOAD = {
    "compressed": (
        "the compressed SLoPe format: only the kept weights and a 3-bit position code per group. Load it with "
        "slope (plain `transformers` cannot read it):\n\n```python\nimport slope\nmodel = slope.load(\"PATH\")"
        "          # a transformers model with SlopeLinear layers\ntokenizer = slope.load_tokenizer(\"PATH\")\n```\n\n"
        "or `slope generate PATH --prompt ...`, `slope eval PATH TEXT`."
    ),
    "dense": (
        "a plain transformers model (the sparse weights stored dense, adapters merged): it loads without "
        "slope.\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH\")\n```\n\n"
        "Its adapters are already in its weights: do not apply the run's adapter folder (the serving "
        "export's `adapter/`) to it, which would count them twice."
    ),
    "serving": (
        "the serving export: a transformers base whose sparse layers keep exactly the N:M zeros, plus the "
        "adapters as a PEFT LoRA folder. Serve it with vLLM (`vllm serve PATH --enable-lora --lora-modules "
        "slope=PATH/adapter`), load it with transformers + PEFT, or with `slope.load(\"PATH\")`; "
        "`slope check PATH` verifies that the base is exactly N:M."
    ),
}


def write_model_card(out: Path, model: nn.Module, kind: str, source_layers: list | None = None) -> Path:
    """Write out/README.md for an export of `kind` (compressed, dense, serving) of `model`.

    source_layers: the SlopeLinear layers the model had before the export changed it (a dense export
    densifies a copy); default: `model`'s own.
    """
    layers = source_layers if source_layers is not None else slope_layers(model)
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", type(model).__name__)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lines = [f"# {family} trained with slope", ""]
    if layers:
        cfg = layers[0][1].config
        ranks = sorted({layer.rank for _, layer in layers})
        adapters = f"low-rank adapters of rank {', '.join(map(str, ranks))}" if any(ranks) else "no adapters"
        lines += [
            f"A {family} causal language model pretrained with SLoPe: {len(layers)} linear layers are "
            f"{cfg.n}:{cfg.m} sparse (a static magnitude mask from the first step; the backward pass multiplied "
            f"with a second, column-wise pruned copy{'' if cfg.double_prune else ' — off in this run'}), with "
            f"{adapters}. The embeddings, the LM head and the layers listed as skipped in the export stay dense.",
        ]
    else:
        lines += [f"A {family} causal language model trained with slope (every layer dense)."]
    lines += ["", f"Parameters stored here: {params:,}.", "", "## Loading", "", f"This folder holds {_LOAD[kind]}"]
    path = Path(out) / README_FILE
    path.write_text("\n".join(lines).replace("PATH", Path(out).name) + "\n")
    return path
