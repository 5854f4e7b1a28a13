"""A new run that starts from another run's weights: `slope train --init-from RUN_OR_CHECKPOINT` (`run.init_from`).

A warm start, as nanoGPT's `init_from` or a Hugging Face warm start: the new run builds its model from its
own config like any run, then takes the source checkpoint's weights, masks, adapters and the sparse
layers' step counters (so M_C's refresh schedule goes on), and trains them from step 0 with a new AdamW
state and a new warm-up/cosine schedule over its own train.max_steps. It tokenizes its data with the
source's tokenizer, so token ids mean what the weights learned. A model that does not fit the source
(another N:M, dense against sparse layers, another [model]) is refused in one line before any data work.

A resumed init-from run continues from its own checkpoint and never reads the source again: its trainer
state holds what was taken (`load_source`'s record), from which `add_source_adapters` makes the source's
adapters again before that checkpoint is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slope.config import SlopeConfig
from slope.convert import slope_layers
from slope.io import checkpoint
from slope.io.format import (
    INFO_FILE,
    TOKENIZER_DIR,
    WEIGHTS_FILE,
    FormatError,
    UnsupportedFormatError,
    check_checkpoint_masks,
    one_line,
)
from slope.io.load import resolve_model_dir
from slope.linear import SlopeLinear
from slope.srste import srste_layers
from slope.train.distributed import tied_aliases
from slope.train.methods import Method
from slope.train.optim import new_group_options
from slope.train.runconfig import ConfigError, RunConfig
from slope.train.sources import resolve_source
from slope.train.token_files import vocab_digest
from slope.train.tokenizing import pretrained_tokenizer

log = logging.getLogger("slope")

# How a model stores its linear layers, by the method that trains that way (the one to name in a refusal).
LAYOUTS = {"dense": "dense layers", "slope": "sparse N:M layers", "srste": "dense weights under an SR-STE N:M mask"}


@dataclass(frozen=True)
class Source:
    """The checkpoint a run starts from: its folder, its slope.json, and what the run gave as init_from."""

    checkpoint: Path
    info: dict
    given: str

    @property
    def tokenizer_dir(self) -> Path:
        return self.checkpoint / TOKENIZER_DIR

    @property
    def step(self) -> int:
        return int(self.info.get("step", 0))

    def refuse(self, what: str) -> ConfigError:
        return ConfigError(f"--init-from {self.given}: {what}")


def find_source(cfg: RunConfig) -> Source:
    """The intact checkpoint `run.init_from` names (a run: its latest that passes the manifest check),
    and the run's tokenizer checked against it; ConfigError in one line otherwise."""
    given = cfg.run.init_from
    try:
        found = resolve_model_dir(given)
    except FileNotFoundError as err:
        raise ConfigError(f"--init-from {given}: {err}; give a training run directory or one of its "
                          "checkpoints/step_N") from None
    if found.kind != "checkpoint":
        kind = "a slope export" if found.kind == "export" else "a Hugging Face model folder"
        raise ConfigError(f"--init-from {given}: this is {kind}, not a training run or checkpoint; give the "
                          "training run directory it came from (or one of its checkpoints/step_N)")
    ckpt, info = _intact_checkpoint(Path(given), found.path)
    source = Source(ckpt, info, given)
    if not source.tokenizer_dir.is_dir():
        raise source.refuse(f"{source.tokenizer_dir} is missing: the new run takes the source's tokenizer")
    _check_tokenizer(source, cfg)
    return source


def _check_tokenizer(source: Source, cfg: RunConfig) -> None:
    """The run tokenizes its data with the source's tokenizer, so that token ids mean what its weights
    learned: a tokenizer.name, or a data.train prepared with its own tokenizer, must have its vocabulary."""
    vocab = vocab_digest(source_tokenizer(source))
    name = cfg.tokenizer.name
    if name and vocab_digest(pretrained_tokenizer(name)) != vocab:
        raise source.refuse(f"tokenizer.name {name!r} has another vocabulary than the source checkpoint's "
                            f"tokenizer ({source.tokenizer_dir}), which the new run takes; give no tokenizer.name")
    data = resolve_source(cfg.data.train, text_column=cfg.data.text_column)
    if data.kind == "prepared" and vocab_digest(pretrained_tokenizer(str(data.path / TOKENIZER_DIR))) != vocab:
        raise source.refuse(f"data.train {cfg.data.train} was prepared with another tokenizer than the source "
                            "checkpoint's; give its text, which the run then tokenizes with the source's")


def _intact_checkpoint(given: Path, resolved: Path) -> tuple[Path, dict]:
    """(checkpoint, slope.json) that passes its manifest check: `resolved` itself when a checkpoint was
    given; for a run, its latest, else the newest intact one (with a warning naming the damaged)."""
    candidates = [resolved]
    if not (given / INFO_FILE).is_file():
        candidates += [p for p in reversed(checkpoint.list_checkpoints(given)) if p != resolved]
    damaged = []
    for ckpt in candidates:
        try:
            info = checkpoint.verify_checkpoint(ckpt)
            check_checkpoint_masks(ckpt / WEIGHTS_FILE, info)  # the invariants resume and slope.load check
        except UnsupportedFormatError as err:
            raise ConfigError(f"--init-from {given}: {err}") from None
        except FormatError as err:
            if len(candidates) == 1:
                raise ConfigError(f"--init-from {given}: {err}") from None
            log.warning("checkpoint %s is damaged, not starting from it: %s", ckpt, err)
            damaged.append(ckpt.name)
            continue
        if damaged:
            log.warning("starting from %s instead: %s failed the manifest check", ckpt.name, ", ".join(damaged))
        return ckpt, info
    raise ConfigError(f"--init-from {given}: no intact checkpoint ({', '.join(damaged)} failed the manifest check)")


def source_tokenizer(source: Source):
    """The source checkpoint's tokenizer, the one the new run's data is tokenized with."""
    return pretrained_tokenizer(str(source.tokenizer_dir))


# ---- the model --------------------------------------------------------------------------------------


def load_source(source: Source, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: RunConfig) -> dict:
    """The source's weights, masks, adapters and layer step counters in the run's freshly built `model`.

    Checked before anything is loaded, a refusal in one line: the layout (dense or sparse, N:M), which
    layers are sparse, then every tensor's name and shape. The source's adapters join `model` and, in a param group of
    their own, `optimizer`, as the method adds its own. Returns the record the trainer state keeps.
    """
    weights = source.checkpoint / WEIGHTS_FILE
    try:
        with safe_open(weights, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
            _check_layout(source, model, cfg, shapes)
            ranks = {name: SlopeLinear.saved_rank(lambda key: f.get_tensor(key) if key in shapes else None, f"{name}.")
                     for name, _ in slope_layers(model)}
    except (OSError, SafetensorError) as err:
        raise FormatError(f"{weights}: cannot read it ({one_line(err)})") from err
    slope_config = source.info.get("slope_config")
    record = {"checkpoint": str(source.checkpoint.resolve()), "step": source.step,
              "adapter_ranks": {name: rank for name, rank in ranks.items() if rank},
              "adapter_scale": slope_config and slope_config.get("adapter_scale")}
    add_source_adapters(model, optimizer, record, cfg)
    _check_tensors(source, model, shapes)
    try:
        safetensors.torch.load_model(model, str(weights), strict=True, device=str(next(model.parameters()).device))
    except (RuntimeError, ValueError, SafetensorError) as err:
        raise FormatError(f"{weights} does not fit its {INFO_FILE}: {one_line(err)}") from err
    log.info("initialised from %s (step %d of its run): %s; new optimizer and schedule",
             source.checkpoint, source.step, _what_was_taken(model, record))
    return record


def _layout(info: dict) -> str:
    if info.get("slope_config") is None:
        return "dense"
    return "srste" if info.get("prune_on_load", False) else "slope"


def _model_layout(model: nn.Module) -> str:
    if slope_layers(model):
        return "slope"
    return "srste" if srste_layers(model) else "dense"


def _check_layout(source: Source, model: nn.Module, cfg: RunConfig, shapes: dict) -> None:
    """Dense against sparse, the N:M, and which layers are sparse: as in the source, or one line."""
    info = source.info
    theirs = _layout(info)
    ours = _model_layout(model)
    if theirs != ours:
        raise source.refuse(f"the source checkpoint has {LAYOUTS[theirs]} (method {info.get('method')}) and this run's "
                            f"model has {LAYOUTS[ours]} (method {cfg.method.name}); give --method {theirs}")
    if theirs == "dense":
        return
    saved = SlopeConfig(**info["slope_config"])
    n, m = saved.n, saved.m
    if (n, m) != (cfg.slope.n, cfg.slope.m):
        raise source.refuse(f"the source checkpoint is {n}:{m} sparse and this run's [slope] is {cfg.slope.n}:"
                            f"{cfg.slope.m}; give --slope.n={n} --slope.m={m}")
    # of the layers both have: a layer only one has is another [model], which the tensors' check names
    modules = dict(model.named_modules())
    sparse_there = {key.removesuffix(".row_bits") for key in shapes if key.endswith(".row_bits")} & modules.keys()
    sparse_here = {name for name, _ in slope_layers(model) if f"{name}.weight" in shapes}
    if ours == "slope" and sparse_there != sparse_here:
        name = sorted(sparse_there ^ sparse_here)[0]
        where = "the source checkpoint" if name in sparse_there else "this run's model"
        raise source.refuse(f"layer {name} is sparse only in {where}; give the same [slope] settings as the source "
                            "run (skip, keep_first_linear_dense, on_indivisible)")


def _check_tensors(source: Source, model: nn.Module, shapes: dict) -> None:
    """Every tensor of `model` in the source with its shape, and nothing else there; else one line."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    for key, shape in expected.items():
        if key in shapes and shapes[key] != shape:
            raise source.refuse(f"{key} has shape {shapes[key]} in the source checkpoint and {shape} in this run's "
                                "model; give the same [model] settings as the source run")
    tied = tied_aliases(model)  # stored once in a checkpoint: a tied name the source stores is an untied model
    missing = [key for key in expected if key not in shapes and key not in tied]
    extra = [key for key in shapes if key not in expected or key in tied]
    for keys, where in ((missing, "this run's model has {}, which the source checkpoint has not"),
                        (extra, "the source checkpoint has {}, which this run's model has not")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            # M_C is kept with double pruning only
            section = "[slope] settings (double_prune)" if keys[0].endswith(".col_bits") else "[model] settings"
            raise source.refuse(f"{where.format(keys[0])}{more}; give the same {section} as the source run")


def summary_of(record: dict | None) -> dict | None:
    """summary.json's account of where the run started: the source checkpoint, its step, its adapters' ranks."""
    if record is None:
        return None
    return {"checkpoint": record["checkpoint"], "step": record["step"],
            "adapter_ranks": sorted(set(record["adapter_ranks"].values()))}


def _what_was_taken(model: nn.Module, record: dict) -> str:
    parts = ["weights"]
    if slope_layers(model):
        parts.append("masks")
    ranks = sorted(set(record["adapter_ranks"].values()))
    if ranks:
        parts.append(f"adapters of rank {', '.join(map(str, ranks))}")
    return ", ".join(parts)


# ---- a run's structure --------------------------------------------------------------------------------


def add_source_adapters(model: nn.Module, optimizer: torch.optim.Optimizer, record: dict | None,
                        cfg: RunConfig) -> None:
    """The adapters the run took from its source (`load_source`'s record), made again on the sparse layers
    of `model`, in one new param group of `optimizer`: the group the method would have added, so a
    resumed checkpoint's param groups come back in the order it was written with. Their values are
    loaded next."""
    if not has_source_adapters(record):
        return
    layers = dict(slope_layers(model))
    params = []
    for name, rank in record["adapter_ranks"].items():
        # the source's scale, as its layers derived it: the new run's [slope] may set another
        params += layers[name].add_adapter(int(rank), scale=record["adapter_scale"] or 1.0 / int(rank))
    optimizer.add_param_group({"params": params, **new_group_options(0, cfg)})


def has_source_adapters(record: dict | None) -> bool:
    """Whether the run's adapters came with its source's weights (then the method adds none)."""
    return bool(record and record["adapter_ranks"])


def adapter_step(method: Method, max_steps: int, record: dict | None) -> int | None:
    """The step before which the method adds adapters in this run: none when they came with the source."""
    return None if has_source_adapters(record) else method.adapter_step(max_steps)


def structure_steps(method: Method, max_steps: int, record: dict | None) -> list[int]:
    """The steps at which the method changes the model's parameters in this run (see `adapter_step`)."""
    steps = method.structure_steps(max_steps)
    if has_source_adapters(record):
        return [step for step in steps if step != method.adapter_step(max_steps)]
    return steps
