"""PEFT interop: LoRA on SlopeLinear layers, and SLoPe adapters as a PEFT LoRA adapter folder.

PEFT's LoRA dispatches only the layer types it knows (nn.Linear, Conv1D, ...), and its
`target_modules="all-linear"` collects only nn.Linear / Conv1D. Two small hooks make a sparsified
model a normal PEFT target:

- `SlopeLoraLinear`: the LoRA layer for a SlopeLinear base, registered on a `LoraConfig` through
  PEFT's custom-module mechanism (`LoraConfig._register_custom_module`). It is PEFT's own
  `lora.Linear` (forward, dropout, scaling, adapter bookkeeping) with the parts that read a dense
  base weight replaced: in/out features come from the SlopeLinear, and merging is refused, since
  adding B·A into a 2:4 weight would destroy its sparsity.
- `prepare_lora_config(config, model)`: registers that layer and resolves "all-linear" the way PEFT
  does for nn.Linear (every linear layer except the output embeddings), SlopeLinear included.

`get_peft_model(model, config)` is `peft.get_peft_model` after `prepare_lora_config`;
`load_peft_adapter(base, folder)` is `PeftModel.from_pretrained` with the prepared config, so an
adapter folder loads on a sparse base too (on a dense base plain `PeftModel.from_pretrained` works).

`save_peft_adapter(model, folder)` writes the adapters `slope.add_adapters` trained as a PEFT LoRA
adapter folder (adapter_config.json + adapter_model.safetensors). Conventions:
    SLoPe  y = x W_Rᵀ + b + (x A) B · s        A (in, r), B (r, out), s = adapter_scale
    LoRA   y = base(x) + lora_B(lora_A(x)) · α/r   lora_A.weight (r, in), lora_B.weight (out, r)
so lora_A.weight = Aᵀ, lora_B.weight = Bᵀ and lora_alpha = s·r (chosen so that α/r == s exactly in
floating point). Layers with another rank or scale than the most common get `rank_pattern` /
`alpha_pattern` entries. `strip_adapters(model)` removes the adapters from a model, leaving the
sparse base the folder is applied to.

peft is optional: `pip install 'slope[peft]'`.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from torch import nn

from slope.convert import slope_layers
from slope.linear import SlopeLinear, is_conv1d

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a model wrapped by get_peft_model

__all__ = [  # and SlopeLoraLinear, built on first access (module __getattr__)
    "get_peft_model", "load_peft_adapter", "lora_alpha_for", "prepare_lora_config", "save_peft_adapter",
    "strip_adapters",
]


def _lora():
    try:
        import peft
        from peft.tuners.lora.layer import Linear
    except ImportError as err:
        raise ImportError(f"peft is not installed ({err}); install it with: pip install 'slope[peft]'") from err
    return peft, Linear


_built: dict[str, type] = {}  # "SlopeLoraLinear" -> the class, once built


def _slope_lora_class() -> type:
    """SlopeLoraLinear, built on first use (it subclasses a peft class, and importing this module must not
    import peft); `slope.io.peft.SlopeLoraLinear` returns it too."""
    if "SlopeLoraLinear" not in _built:
        _, Linear = _lora()

        class _SlopeLoraLinear(Linear):
            """PEFT LoRA around a SlopeLinear: y = base(x) + lora_B(lora_A(dropout(x))) · scaling.

            The base keeps its 2:4 weight and runs its own (sparse) forward and backward.
            """

            def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
                return module.in_features, module.out_features

            def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
                raise NotImplementedError(
                    "merging LoRA into a SlopeLinear would make its N:M weight dense; keep the adapter separate, "
                    "or slope.densify the base first"
                )

        _SlopeLoraLinear.__name__ = _SlopeLoraLinear.__qualname__ = "SlopeLoraLinear"
        _built["SlopeLoraLinear"] = _SlopeLoraLinear
    return _built["SlopeLoraLinear"]


def __getattr__(name: str):
    if name == "SlopeLoraLinear":
        return _slope_lora_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _linear_names(model: nn.Module) -> list[str]:
    """PEFT's "all-linear" set with SlopeLinear counted as linear: every nn.Linear, Conv1D and SlopeLinear
    except the output embeddings (PEFT's rule for a transformers model) and layers inside PEFT layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {name for name, mod in model.named_modules()
             if isinstance(mod, (nn.Linear, SlopeLinear)) or is_conv1d(mod)}
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            names.discard(name)
        if isinstance(mod, BaseTunerLayer):  # no LoRA inside an existing adapter layer (its lora_A, ...)
            names -= {f"{name}.{sub}" for sub, _ in mod.named_modules() if sub}
    return sorted(names)


def prepare_lora_config(config, model: nn.Module):
    """`config` (a peft LoraConfig), ready for a model with SlopeLinear layers; modified in place and returned.

    Registers `SlopeLoraLinear` for SlopeLinear targets, and replaces target_modules="all-linear" by the
    explicit list of layers PEFT would pick if SlopeLinear were an nn.Linear.
    """
    peft, _ = _lora()
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"the PEFT config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({SlopeLinear: _slope_lora_class()})
    target = getattr(config, "target_modules", None)
    if isinstance(target, str) and target.lower() == "all-linear":
        config.target_modules = _linear_names(model)
    return config


def get_peft_model(model: nn.Module, config, **kwargs):
    """`peft.get_peft_model(model, config, **kwargs)` for a model with SlopeLinear layers."""
    peft, _ = _lora()
    return peft.get_peft_model(model, prepare_lora_config(config, model), **kwargs)


def load_peft_adapter(base: nn.Module, folder: str | Path, **kwargs):
    """`peft.PeftModel.from_pretrained(base, folder)` that also accepts a sparse (SlopeLinear) base.

    Refused on a base that already holds SLoPe adapters (its own, or merged into its weights by
    `densify` / the dense export): the folder's adapters would count twice.
    """
    peft, _ = _lora()
    if getattr(getattr(base, "config", None), "slope_adapters_merged", False):
        raise ValueError(f"this model has its adapters merged into its weights (densify or the dense export); "
                         f"applying {folder} as well would count them twice: load the adapter folder onto the "
                         "sparse base (the serving export's base, or slope.strip_adapters(model))")
    if any(layer.rank for _, layer in slope_layers(base)):
        raise ValueError(f"this model's SlopeLinear layers carry their own adapters; applying {folder} as well "
                         "would count them twice: remove them first with slope.strip_adapters(model)")
    config = peft.LoraConfig.from_pretrained(str(folder))
    return peft.PeftModel.from_pretrained(base, str(folder), config=prepare_lora_config(config, base), **kwargs)


def lora_alpha_for(scale: float, rank: int) -> float:
    """α with α / rank == scale in float arithmetic (what PEFT computes as `scaling`), where one exists.

    s·r/r is s up to an ulp; a neighbour of s·r often divides back exactly. For the few (s, r) where
    no float does, s·r (off by one ulp of s).
    """
    alpha = scale * rank
    candidates = [alpha]
    up = down = alpha
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return next((a for a in candidates if a / rank == scale), alpha)


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the SLoPe adapters of `model` as a PEFT LoRA adapter folder; returns it.

    Apply it to `strip_adapters(model)` (sparse) or to that model densified, with `load_peft_adapter`
    / `peft.PeftModel.from_pretrained`; vLLM serves it with `--enable-lora`.
    """
    peft, _ = _lora()
    from safetensors.torch import save_file

    layers = [(name, layer) for name, layer in slope_layers(model) if layer.rank]
    if not layers:
        raise ValueError("save_peft_adapter: the model has no adapters (slope.add_adapters adds them)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty directory")
    tensors = {}
    ranks, alphas = {}, {}
    for name, layer in layers:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.adapter_a.detach().t().contiguous().cpu()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.adapter_b.detach().t().contiguous().cpu()  # (out, r)
        ranks[name] = layer.rank
        alphas[name] = lora_alpha_for(layer.adapter_scale, layer.rank)
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    # Full module names: the layers PEFT must wrap are exactly the ones with SLoPe adapters (a leaf name
    # like "q_proj" would also match the first layers, which stay dense and have none). A pattern
    # key that is a full name matches only that module.
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        # a GPT-2 Conv1D stores its weight (in, out); PEFT wants this set for such a dense base
        fan_in_fan_out=any(layer.source == "conv1d" for _, layer in layers),
        target_modules=[name for name, _ in layers],
        rank_pattern={name: k for name, k in ranks.items() if k != r},
        alpha_pattern={name: a for name, a in alphas.items() if a != alpha},
        base_model_name_or_path=base_model_name_or_path,
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    config.save_pretrained(str(out))  # adapter_config.json, written by peft itself
    return out


def strip_adapters(model: nn.Module) -> nn.Module:
    """Remove the SLoPe adapters from every SlopeLinear of `model`, in place: the sparse base alone."""
    for _, layer in slope_layers(model):
        layer.remove_adapters()
    return model
