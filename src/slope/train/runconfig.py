"""The run configuration of `slope train`: dataclass sections, TOML files and `--section.key=value` overrides.

Every value is type-checked against its dataclass annotation, so a typo in a key or a wrong type is an
error naming the key and what it expects; each section then checks its own ranges and choices (`check`).
The `[slope]` section *is* `slope.SlopeConfig`, so every knob of the method is configurable without
being listed twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from slope.config import SlopeConfig

# The families `model.preset` builds from the [model] sizes; anything else names a config file, folder or
# cached hub model (slope.train.models builds them; the names live here so validation sees them).
PRESETS = ("llama", "gpt2", "opt")

# The byte-level BPE starts from 256 byte tokens and the end-of-text token; it needs room for one merge.
BPE_MIN_VOCAB = 258


class ConfigError(ValueError):
    """A bad key or value in a run file or an override; the message names the key."""


# ---- checks: each section checks its own fields (`check`), with these ------------------------------


def _finite(key: str, value: float) -> None:
    # NaN passes every range check, and an infinite lr or eps turns the first step into NaN.
    if not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}; got {value!r}")


@dataclass
class RunSection:
    name: str = "shakespeare"  # run directory prefix: <out_dir>/<name>-<method>-<timestamp>
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto (cuda if present, else cpu), cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto (bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU), fp32, bf16, fp16
    compile: bool = False  # torch.compile the model (no gain on CPU, measured)
    # Under torchrun: "auto" (ddp when the world has more than one process, else none), none, ddp, fsdp.
    parallel: str = "auto"
    dist_timeout: float = 600.0  # seconds a collective may wait on another rank before the job stops
    logger: str = "tensorboard"  # where scalars go besides metrics.jsonl: tensorboard, wandb, none
    # torch's CPU threads per process: 0 = auto (the cores not busy with other work when the run starts,
    # shared among the processes of this machine; at least 1), else exactly this many
    threads: int = 0
    init_from: str = ""  # a run or checkpoint whose weights this new run starts from; "" = none (--init-from)

    def check(self) -> None:
        _finite("run.dist_timeout", self.dist_timeout)
        _positive("run.threads", self.threads, allow_zero=True)
        _positive("run.dist_timeout", self.dist_timeout)
        _one_of("run.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _one_of("run.parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))
        _one_of("run.logger", self.logger, ("tensorboard", "wandb", "none"))


@dataclass
class ModelSection:
    # "llama", "gpt2", "opt", a transformers config JSON file or directory, or a hub name already in the
    # local cache. The sizes below apply to the three presets only.
    preset: str = "llama"
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    intermediate_size: int = 688  # MLP width; 0 = the family's default (4x hidden)
    max_seq_len: int = 0  # position table size; 0 = train.seq_len
    tie_embeddings: bool = True
    dropout: float = 0.0
    # multiplies the initial weights of the blocks' linear layers; 0 = the `linear_init_scale` of the
    # method's class (slope.train.methods), written into the run's config as that number
    linear_init_scale: float = 0.0

    def check(self) -> None:
        _finite("model.linear_init_scale", self.linear_init_scale)
        _finite("model.dropout", self.dropout)
        _positive("model.max_seq_len", self.max_seq_len, allow_zero=True)
        if self.preset in PRESETS:  # a user's config file or folder brings its own sizes
            _positive("model.hidden_size", self.hidden_size)
            _positive("model.num_layers", self.num_layers)
            _positive("model.num_heads", self.num_heads)
            _positive("model.intermediate_size", self.intermediate_size, allow_zero=True)
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"config key 'model.hidden_size' ({self.hidden_size}) must be a multiple of "
                                  f"model.num_heads ({self.num_heads})")
        _positive("model.linear_init_scale", self.linear_init_scale, allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'model.dropout' must be in [0, 1), got {self.dropout}")


@dataclass
class DataSection:
    # An embedded corpus (slope.train.corpus: "shakespeare", "milton", ...), a text file, a folder of text,
    # a .jsonl file (`text` field), a saved Hugging Face dataset folder, or a `slope prepare` output folder.
    train: str = "shakespeare"
    # Validation source for periodic evaluation; "" = the final `val_fraction` of `train`'s text;
    # "auto" = the held-out works for the embedded Shakespeare, else "".
    val: str = "auto"
    val_fraction: float = 0.05
    text_column: str = "text"  # the column (or JSON field) holding the text in datasets, parquet and JSONL

    def check(self) -> None:
        if not self.text_column:
            raise ConfigError("config key 'data.text_column' must name a column, got ''")
        _finite("data.val_fraction", self.val_fraction)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {self.val_fraction}")


@dataclass
class TokenizerSection:
    name: str = ""  # "" = train a byte-level BPE on the training text; else an AutoTokenizer path/cached name
    vocab_size: int = 8192  # of the trained BPE

    def check(self) -> None:
        _positive("tokenizer.vocab_size", self.vocab_size)
        if not self.name and self.vocab_size < BPE_MIN_VOCAB:
            raise ConfigError(
                f"config key 'tokenizer.vocab_size' is too small for the byte-level BPE: it must be at least "
                f"{BPE_MIN_VOCAB} (256 bytes, the end-of-text token and one merge), got {self.vocab_size}"
            )


@dataclass
class MethodSection:
    name: str = "slope"  # a method of slope.train.methods.METHODS: dense, slope, srste, wanda
    # The method's own keys, written flat in [method] (e.g. srste_decay = 2e-4): each method declares,
    # types and checks them (its `Options`); here they are only carried. The options of slope live in [slope].
    options: dict = field(default_factory=dict)

    def check(self) -> None:
        """The name, and the method's keys typed by its `Options` and checked by it (kept with every default)."""
        from slope.train.methods import METHODS  # late: methods imports torch
        from slope.train.methods.base import make_options

        _one_of("method.name", self.name, tuple(METHODS))
        method = METHODS[self.name]
        types_ = typing.get_type_hints(method.Options)
        for key in self.options:
            if key not in types_:
                allowed = ", ".join(sorted(types_)) or "none"
                raise ConfigError(f"config key 'method.{key}' does not apply to method {method.name!r} "
                                  f"(its [method] keys: {allowed})")
        self.options = {key: _coerce(value, types_[key], f"method.{key}") for key, value in self.options.items()}
        try:
            options = make_options(method, self.options)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.options = dataclasses.asdict(options)  # every key with its value, defaults included: the record


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1  # on matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    impl: str = "auto"  # auto (fused on GPU, foreach on CPU), fused, foreach, loop

    def check(self) -> None:
        for name in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "grad_clip"):
            _finite(f"optim.{name}", getattr(self, name))
        _positive("optim.lr", self.lr)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.eps", self.eps)
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"config key 'optim.{name}' must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"config key 'optim.min_lr_ratio' must be in [0, 1], got {self.min_lr_ratio}")
        _one_of("optim.impl", self.impl, ("auto", "fused", "foreach", "loop"))


@dataclass
class TrainSection:
    max_steps: int = 200
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    log_every: int = 10
    gradient_checkpointing: bool = False  # recompute block activations in the backward: less memory, more time

    def check(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            _positive(f"train.{name}", getattr(self, name))


@dataclass
class EvalSection:
    every: int = 50  # steps between validation evals; 0 = only at the end
    max_tokens: int = 8192  # tokens per periodic validation
    final_max_tokens: int = 32768  # tokens per final evaluation set (evenly spaced windows)
    batch_size: int = 8
    sets: list[str] = field(default_factory=lambda: ["shakespeare-heldout", "milton"])

    def check(self) -> None:
        self.sets = list(dict.fromkeys(self.sets))  # a set named twice is evaluated once, in the order given
        _positive("eval.every", self.every, allow_zero=True)
        for name in ("max_tokens", "final_max_tokens", "batch_size"):
            _positive(f"eval.{name}", getattr(self, name))


@dataclass
class CheckpointSection:
    every: int = 100  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2

    def check(self) -> None:
        _positive("checkpoint.every", self.every)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    method: MethodSection = field(default_factory=MethodSection)
    slope: SlopeConfig = field(default_factory=SlopeConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict:
        return {f.name: _section_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)  # section name -> dataclass


# ---- types ----------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        item = typing.get_args(tp)[0]
        return "a list of " + {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """`value` (from TOML) checked against annotation `tp`; raises ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)[:1]
            try:
                items = [_coerce(v, item, key) for v in value]
            except ConfigError:
                items = None  # reported below against the whole list type
            if items is not None:
                return tuple(items) if origin is tuple else items
    elif (tp is type(None) and value is None) or (tp is bool and isinstance(value, bool)):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
        return value  # an integer that torch and numpy hold; TOML's reach far beyond
    elif tp is float and isinstance(value, int | float) and not isinstance(value, bool) and (
            isinstance(value, float) or abs(value) < 2**63):  # a longer integer is no float
        return float(value)
    elif tp is str and isinstance(value, str):
        return value
    # reprlib: a TOML value may be a list of a million items, or nested thousands of levels deep
    raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {reprlib.repr(value)}")


def _parse_text(text: str, tp, key: str):
    """A command-line string converted to annotation `tp` (TOML syntax, or a bare word for strings)."""
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    try:
        value = _loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):  # not TOML (nested too deep, too many digits included)
        value = text  # a bare word: a string (e.g. --method.name=dense)
    if _is_str_list(tp) and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]  # --eval.sets=a,b
    if _accepts_str(tp) and not isinstance(value, str) and not isinstance(value, list):
        value = text  # --run.name=123 is the string "123"
    return _coerce(value, tp, key)


def _accepts_str(tp) -> bool:
    return tp is str or str in typing.get_args(tp)


def _is_str_list(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple) and typing.get_args(tp)[:1] == (str,)


# ---- building -------------------------------------------------------------------------------------


def _build_section(name: str, values: dict):
    if name == "method":  # [method]: `name`, and keys its method owns (typed in `MethodSection.check`)
        options = {k: v for k, v in values.items() if k != "name"}
        return MethodSection(_coerce(values.get("name", MethodSection.name), str, "method.name"), options)
    cls = SECTIONS[name]
    types_ = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"unknown config key '{name}.{key}'; section [{name}] has: {', '.join(types_)}")
        kwargs[key] = _coerce(value, types_[key], f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # SlopeConfig validates its values itself
        raise ConfigError(f"[{name}]: {err}") from None


def from_dict(data: dict) -> RunConfig:
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown config section '{unknown[0]}'; sections are: {', '.join(SECTIONS)}")
    sections = {}
    for name in SECTIONS:
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a table ([{name}]), got {reprlib.repr(values)}")
        sections[name] = _build_section(name, values)
    cfg = RunConfig(**sections)
    validate(cfg)
    return cfg


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--section.key=value` or `--section.key value` tokens -> {"section.key": "value"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognized argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE")
        out[key] = value
        i += 1
    return out


def apply_overrides(data: dict, overrides: dict[str, str]) -> dict:
    """Merge string overrides into raw config data, converting each to its annotated type."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}  # from_dict reports non-tables
    for dotted, text in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}' in --{dotted}; sections are: {', '.join(SECTIONS)}")
        types_ = typing.get_type_hints(SECTIONS[section])
        if section == "method" and key != "name":  # a method's own key: its type is the method's (see MethodSection.check)
            try:  # TOML syntax (1e-3, true), else the bare word as a string
                data.setdefault(section, {})[key] = _loads(f"v = {text}")["v"]
            except (ValueError, RecursionError):
                data.setdefault(section, {})[key] = text
            continue
        if key not in types_:
            raise ConfigError(f"unknown config key '{dotted}'; section [{section}] has: {', '.join(types_)}")
        data.setdefault(section, {})[key] = _parse_text(text, types_[key], dotted)
    return data


def _loads(text: str) -> dict:
    """tomllib.loads; RecursionError for a dotted key (`a.b.c = 1`, `[a.b.c]`) of 100 parts or more, as for values
    nested thousands deep: tomllib's time and memory grow with the square of a key's parts (100,000: gigabytes)."""
    if re.search(r"(?:^|[\[{,])[ \t]*(?:(?:[\w-]+|\"[^\"\n]*\"|'[^'\n]*')[ \t]*\.[ \t]*){100}", text, re.M):
        raise RecursionError("a dotted key of 100 parts or more")
    return tomllib.loads(text)


def read_toml(path: Path) -> dict:
    try:
        return _loads(Path(path).read_bytes().decode())
    except UnicodeDecodeError:  # a Latin-1 or UTF-16 file
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except RecursionError:  # tables or arrays nested thousands deep; a dotted key of thousands of parts
        raise ConfigError(f"{path}: nested too deeply to be a run config") from None
    except ValueError as err:  # TOMLDecodeError; an integer of more digits than Python converts
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def find_config(name_or_path: str) -> Path:
    """A run file path, or the name of a config shipped with the package (`default`, `tiny`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("slope") / "configs" / f"{name_or_path.removesuffix('.toml')}.toml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".toml") for p in (resources.files("slope") / "configs").iterdir()
                   if p.name.endswith(".toml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped config ({', '.join(names)})")


def resolve(config: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config: dataclass defaults, then the run file (if any), then the overrides."""
    data = read_toml(find_config(config)) if config else {}
    data = apply_overrides(data, parse_overrides(overrides or []))
    return from_dict(data)


def validate(cfg: RunConfig) -> None:
    """Each section's own range and choice checks (`check`); [slope], a SlopeConfig, checks itself when
    built. Rules spanning two sections go here. [method] comes last: it imports the methods."""
    for section in (cfg.data, cfg.run, cfg.model, cfg.optim, cfg.train, cfg.eval, cfg.checkpoint, cfg.tokenizer,
                    cfg.method):
        section.check()
    if cfg.model.linear_init_scale == 0:  # the method's default, resolved so a resume keeps it if that changes
        from slope.train.methods import METHODS

        cfg.model.linear_init_scale = METHODS[cfg.method.name].linear_init_scale


# ---- writing --------------------------------------------------------------------------------------


def _section_dict(section) -> dict:
    if isinstance(section, SlopeConfig):
        return section.to_dict()
    if isinstance(section, MethodSection):  # flat, as [method] is written
        return {"name": section.name, **section.options}
    return dataclasses.asdict(section)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML; `None` values (TOML has no null) are written as comments."""
    lines = []
    for name, values in cfg.to_dict().items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"# {key} = none" if value is None else f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def save(cfg: RunConfig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_toml(cfg))
    tmp.replace(path)
