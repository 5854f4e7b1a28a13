"""Model conversion: `sparsify`, `add_adapters`, `densify`, and the skip rule with its report."""

from __future__ import annotations

import fnmatch
import logging
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from slope.config import SlopeConfig
from slope.linear import SlopeLinear, dense_weight_of, is_conv1d

log = logging.getLogger("slope")

# The key of a transformers config (config.json) that marks a sparsified model and carries its
# SlopeConfig, so that `model.save_pretrained(dir)` writes a folder `slope.load(dir)` rebuilds.
# slope.io.load reads it; the weights file itself says which layers are sparse and their adapter ranks.
HF_CONFIG_KEY = "slope"
HF_CONFIG_FORMAT = "slope-state-dict"


@dataclass
class SparsifyReport:
    """What `sparsify` did, kept on the model as `model.slope_report`."""

    config: SlopeConfig
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    params_before: int = 0
    params_after: int = 0
    first_linear_method: str = ""  # how the first linear layer(s) after the input were found

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "none"
        return (
            f"slope: {len(self.converted)} linear layers converted to {self.config.n}:{self.config.m} "
            f"SlopeLinear, {len(self.skipped)} kept dense ({why}); stored parameters "
            f"{self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.3f}x)"
        )

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(), "converted": self.converted, "skipped": self.skipped,
            "params_before": self.params_before, "params_after": self.params_after,
            "first_linear_method": self.first_linear_method,
        }


def _is_convertible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _matches(name: str, patterns: tuple[str, ...]) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(leaf, pattern):
            return pattern
    return None


def _first_input_linears(model: nn.Module, candidates: list[str]) -> tuple[list[str], str]:
    """Names of the linear layer(s) that first read the model's input, and how they were found.

    With a Hugging Face model we run its `dummy_inputs` once and take the first linear layer called
    plus every other layer called on the very same input tensor (LLaMA's q/k/v projections all read
    the first normalised hidden state). Otherwise the first candidate in registration order.
    """
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict) and "input_ids" in dummy:
        calls: list[tuple[str, torch.Tensor]] = []
        modules = dict(model.named_modules())
        hooks = [
            modules[name].register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
            for name in candidates
        ]
        try:
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            with torch.no_grad():
                model(**{k: v.to(device)[:1, :4] for k, v in dummy.items() if k == "input_ids"})
            model.train(was_training)
        except Exception as err:  # a model whose forward needs more than input_ids
            log.debug("slope: tracing the first linear layer failed (%s); using registration order", err)
            calls = []
        finally:
            for hook in hooks:
                hook.remove()
        if calls:
            first_input = calls[0][1]
            names = [name for name, inp in calls if inp is first_input]
            return list(dict.fromkeys(names)), "traced a forward pass"
    return candidates[:1], "first in registration order"


def _check_type(function: str, name: str, value, expected: type | tuple[type, ...], what: str) -> None:
    """TypeError naming the argument, what it got and what it expects (instead of an AttributeError later)."""
    if not isinstance(value, expected):
        raise TypeError(f"{function}: {name} must be {what}, got {type(value).__name__}")


def sparsify(model: nn.Module, config: SlopeConfig | None = None) -> nn.Module:
    """Swap every eligible nn.Linear / Conv1D of `model` for a SlopeLinear, in place; returns `model`.

    Skipped (kept dense), each with its reason in `model.slope_report`: names matching
    `config.skip`, the first linear layer(s) after the input when `config.keep_first_linear_dense`,
    and layers whose shape is not a multiple of `m` (or an error, per `config.on_indivisible`).
    """
    _check_type("sparsify", "model", model, nn.Module, "a torch.nn.Module")
    _check_type("sparsify", "config", config, (SlopeConfig, type(None)), "a slope.SlopeConfig or None")
    config = config or SlopeConfig()
    if any(isinstance(mod, SlopeLinear) for mod in model.modules()):
        raise ValueError("this model already has SlopeLinear layers; sparsify it only once")
    report = SparsifyReport(config=config, params_before=sum(p.numel() for p in model.parameters()))
    candidates = _convertible_layers(model)
    eligible = _apply_skip_rule(model, candidates, config, report)
    eligible = _skip_indivisible(model, eligible, config, report)
    if not eligible:
        raise ValueError(
            f"nothing to sparsify in {type(model).__name__}: all {len(candidates)} linear layers are skipped "
            f"({report.skipped})"
        )
    modules = dict(model.named_modules())
    for name in eligible:
        replace_module(model, name, SlopeLinear.from_dense(modules[name], config))
        report.converted.append(name)
    report.params_after = sum(p.numel() for p in model.parameters())
    model.slope_report = report
    _mark_hf_config(model, config)
    guard_lora_targets(model)
    log.info(report.summary())
    return model


def _convertible_layers(model: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear / Conv1D of `model`; a ValueError when it has none."""
    candidates = [name for name, mod in model.named_modules() if _is_convertible(mod)]
    if not candidates:
        raise ValueError(
            f"nothing to sparsify in {type(model).__name__}: it has no torch.nn.Linear or transformers "
            "Conv1D layers"
        )
    return candidates


def _apply_skip_rule(model: nn.Module, candidates: list[str], config: SlopeConfig, report: SparsifyReport) -> list[str]:
    """`candidates` less those `config.skip` names and the first linear(s) after the input, each noted in `report`."""
    eligible = []
    for name in candidates:
        pattern = _matches(name, config.skip)
        if pattern is not None:
            report.skipped[name] = f"matches skip pattern {pattern!r}"
        else:
            eligible.append(name)
    if config.keep_first_linear_dense and eligible:
        first, method = _first_input_linears(model, eligible)
        report.first_linear_method = method
        for name in first:
            report.skipped[name] = "first linear after the input"
        eligible = [name for name in eligible if name not in first]
    return eligible


def _skip_indivisible(model: nn.Module, eligible: list[str], config: SlopeConfig, report: SparsifyReport) -> list[str]:
    """`eligible` less the layers N:M groups cannot divide, noted in `report` with one warning for all of them.

    With `config.on_indivisible == "error"` such layers are a ValueError instead, naming each with its shape.
    """
    modules = dict(model.named_modules())
    indivisible = []
    for name in eligible:
        out_f, in_f = dense_weight_of(modules[name])[0].shape
        if config.indivisible_dimension(out_f, in_f) is not None:
            indivisible.append(f"{name} (out={out_f}, in={in_f})")
            report.skipped[name] = f"shape not a multiple of m={config.m}"
    if indivisible:
        message = (
            f"{len(indivisible)} layer(s) have a shape that {config.n}:{config.m} groups cannot divide "
            f"({config.grouped_dimensions()} must be multiples of {config.m}): " + ", ".join(indivisible)
        )
        if config.on_indivisible == "error":
            raise ValueError(message + "; set on_indivisible='skip' to keep them dense")
        log.warning("slope: keeping dense: %s", message)
    return [name for name in eligible if name not in report.skipped]


def _mark_hf_config(model: nn.Module, config: SlopeConfig) -> None:
    """Mark a transformers model's config as sparsified with `config` (see HF_CONFIG_KEY); other models stay as they are."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_dict"):
        setattr(hf_config, HF_CONFIG_KEY, {
            "format": HF_CONFIG_FORMAT, "format_version": 1,
            # the backend is chosen where the model is loaded, not stored
            "slope_config": config.replace(backend="auto").to_dict(),
        })


def guard_lora_targets(model: nn.Module) -> None:
    """Refuse, at the first training forward, a LoRA that went on every dense linear and on no SlopeLinear.

    That is what plain `peft.get_peft_model(model, LoraConfig(target_modules="all-linear"))` does to a
    sparsified model: PEFT's "all-linear" collects nn.Linear and Conv1D only, and freezes the rest, so
    the N:M layers would train nothing. `slope.get_peft_model` wraps them too. A LoRA on a chosen subset
    of layers is not this pattern and passes. A forward pre-hook on the model, registered once; it looks
    only in training mode with gradients on and once PEFT is imported, so other runs pay nothing.
    """
    if not getattr(model, "_slope_lora_guard", False):
        model.register_forward_pre_hook(_refuse_all_linear_lora_without_slope_layers)
        model._slope_lora_guard = True


def _refuse_all_linear_lora_without_slope_layers(model: nn.Module, _args) -> None:
    # A dictionary lookup while PEFT is not even imported: the module walk below runs only where it can matter.
    if "peft" not in sys.modules or not (model.training and torch.is_grad_enabled()):
        return
    lora_layers = {name: mod for name, mod in model.named_modules()
                   if hasattr(mod, "lora_A") and isinstance(getattr(mod, "base_layer", None), nn.Module)}
    if not lora_layers:
        return
    bases = {id(mod.base_layer) for mod in lora_layers.values()}
    sparse = slope_layers(model)
    if not sparse or any(id(layer) in bases for _, layer in sparse):
        return
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    inside_lora = tuple(f"{name}." for name in lora_layers)
    unwrapped_dense = [name for name, mod in model.named_modules()
                       if _is_convertible(mod) and mod is not head and id(mod) not in bases
                       and not name.startswith(inside_lora)]
    if not unwrapped_dense:
        raise ValueError(
            f"LoRA is on every dense linear layer and on none of the model's {len(sparse)} N:M (SlopeLinear) "
            "layers, which stay frozen: PEFT's target_modules='all-linear' does not see SlopeLinear; build "
            "the PEFT model with slope.get_peft_model(model, config) instead of peft.get_peft_model"
        )


def remove_hf_config_mark(model: nn.Module) -> None:
    """Remove the sparsified mark from `model.config`, if it has one: its config.json must not claim sparse layers."""
    if HF_CONFIG_KEY in getattr(getattr(model, "config", None), "__dict__", {}):
        delattr(model.config, HF_CONFIG_KEY)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name` (qualified, e.g. "model.layers.0.mlp.up_proj")."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def for_inference(model: nn.Module) -> nn.Module:
    """`model` in eval mode with every parameter frozen, in place; returns it.

    Frozen SlopeLinear values let a 2:4 GPU backend keep them inside the compressed operand it
    multiplies with, so a served model stores each kept value once, and the column masks, which only
    a backward uses, are dropped (docs/gpu.md, "Memory").
    """
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for _, layer in slope_layers(model):
        layer.release_training_state()
    return model


def dense_equivalent_params(model: nn.Module) -> int:
    """Parameters of `model` counting each SlopeLinear as its full (out, in) weight, adapters included."""
    stored = sum(p.numel() for p in model.parameters())
    return stored + sum(layer.in_features * layer.out_features - layer.weight.numel() for _, layer in slope_layers(model))


def slope_layers(model: nn.Module) -> list[tuple[str, SlopeLinear]]:
    """Every SlopeLinear of `model` with its qualified name."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SlopeLinear)]


def add_adapters(
    model: nn.Module,
    rank: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    param_group: dict | None = None,
) -> list[nn.Parameter]:
    """Add lazy low-rank adapters to every SlopeLinear; returns the new parameters.

    rank: the same absolute rank for every layer; None uses each layer's config (adapter_rank or
        adapter_rank_ratio of its smaller dimension).
    optimizer: if given, the new parameters join it as one new param group (with `param_group`'s
        options, e.g. {"lr": 1e-3}); otherwise add them yourself.
    The model output is unchanged at insertion (B = 0) and the sparse weights keep training.
    """
    _check_type("add_adapters", "model", model, nn.Module, "a torch.nn.Module")
    _check_type("add_adapters", "rank", rank, (int, type(None)), "an int or None")
    if isinstance(rank, bool):
        raise TypeError("add_adapters: rank must be an int or None, got bool")
    _check_type("add_adapters", "optimizer", optimizer, (torch.optim.Optimizer, type(None)),
                "a torch.optim.Optimizer or None")
    _check_type("add_adapters", "param_group", param_group, (dict, type(None)), "a dict or None")
    layers = slope_layers(model)
    if not layers:
        raise ValueError("add_adapters: the model has no SlopeLinear layers; call slope.sparsify(model) first")
    with_adapters = [name for name, layer in layers if layer.rank]
    if with_adapters:
        raise RuntimeError(
            f"add_adapters: adapters were already added ({len(with_adapters)} layers, e.g. {with_adapters[0]}); "
            "they can be added only once"
        )
    new_params: list[nn.Parameter] = []
    for _, layer in layers:
        r = rank if rank is not None else layer.config.rank_for(layer.in_features, layer.out_features)
        new_params += layer.add_adapter(r)
    if optimizer is not None:
        optimizer.add_param_group({"params": new_params, **(param_group or {})})
    log.info(
        "slope: added adapters to %d layers (%s new parameters)",
        len(layers), f"{sum(p.numel() for p in new_params):,}",
    )
    return new_params


def densify(model: nn.Module) -> nn.Module:
    """Replace every SlopeLinear by a plain nn.Linear / Conv1D holding W_R (+ merged adapters).

    The new layers have new parameters: an optimizer built before no longer updates them, so build a new
    one to train on. A model in training mode gets this as a warning (export and inference use eval mode).
    """
    _check_type("densify", "model", model, nn.Module, "a torch.nn.Module")
    layers = slope_layers(model)
    if not layers:
        raise ValueError("densify: the model has no SlopeLinear layers")
    merged = any(layer.rank for _, layer in layers)
    for name, layer in layers:
        weight = layer.merged_dense_weight()  # (out, in)
        bias = layer.bias is not None
        if layer.source == "conv1d":
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(layer.out_features, layer.in_features).to(weight.device, weight.dtype)
            dense.weight.data.copy_(weight.t())
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias, device=weight.device, dtype=weight.dtype)
            dense.weight.data.copy_(weight)
        if bias:
            dense.bias = layer.bias
        elif layer.source == "conv1d":
            dense.bias.data.zero_()
        replace_module(model, name, dense)
    if hasattr(model, "slope_report"):
        del model.slope_report
    remove_hf_config_mark(model)  # its layers are dense again
    if merged and hasattr(model, "config"):
        # recorded in config.json, so that the adapters are not applied a second time (slope.io.peft)
        model.config.slope_adapters_merged = True
    if model.training:
        log.warning("slope: densify replaced %d layers with new parameters; an optimizer built before densify "
                    "no longer updates them: build a new optimizer to keep training", len(layers))
    return model
