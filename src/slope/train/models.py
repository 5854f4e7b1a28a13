"""Model presets and configs: every model is a randomly initialised Hugging Face causal LM."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slope.io.format import HF_CONFIG_FILE
from slope.train.runconfig import PRESETS, ModelSection


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, not cached, does not fit the tokenizer)."""


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def model_config(section: ModelSection, vocab_size: int, seq_len: int, eos_token_id: int | None = None):
    """A transformers config: a preset sized by `section`, or a user's config file / cached hub name.

    vocab_size: the tokenizer's; presets round it up to a multiple of 64 (faster embeddings and
    head on GPUs), user configs must already be at least this large.
    eos_token_id: the tokenizer's end-of-text id, which presets use as bos/eos (generation stops on it).
    """
    from transformers import AutoConfig

    max_pos = section.max_seq_len or seq_len
    vocab = _round_up(vocab_size, 64)
    # Each family's default special ids belong to its own tokenizer, not to ours.
    special = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "pad_token_id": None}
    if section.preset not in PRESETS:
        return _user_config(section.preset, AutoConfig)
    try:
        return _preset_config(section, vocab, max_pos, special)
    except Exception as err:  # transformers validates with its own types (ValueError, huggingface_hub's)
        detail = " ".join(str(err).split())
        raise ModelError(f"model.preset {section.preset!r} cannot be built with these [model] sizes: {detail}") from None


def _preset_config(section: ModelSection, vocab: int, max_pos: int, special: dict):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    hidden, layers, heads = section.hidden_size, section.num_layers, section.num_heads
    inter = section.intermediate_size or 4 * hidden
    if section.preset == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_pos,
            tie_word_embeddings=section.tie_embeddings, attention_dropout=section.dropout, **special,
        )
    elif section.preset == "gpt2":
        # GPT-2 always ties its head to the embeddings; its linear layers are Conv1D.
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, n_positions=max_pos,
            resid_pdrop=section.dropout, embd_pdrop=section.dropout, attn_pdrop=section.dropout, **special,
        )
    else:
        config = OPTConfig(
            vocab_size=vocab, hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_pos, word_embed_proj_dim=hidden,
            dropout=section.dropout, attention_dropout=section.dropout,
            tie_word_embeddings=section.tie_embeddings, **special,  # (OPT's pad id 1 would freeze a token)
        )
    return config


def _user_config(name: str, auto_config):
    path = Path(name)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ModelError(f"model config {path} is not valid JSON: {err}") from None
        if "model_type" not in data:
            raise ModelError(f"model config {path} has no 'model_type' (e.g. \"llama\", \"gpt2\")")
        try:
            return auto_config.for_model(data.pop("model_type"), **data)
        except ValueError as err:
            raise ModelError(f"model config {path}: {err}") from None
    if path.is_dir():
        if not (path / HF_CONFIG_FILE).is_file():
            raise ModelError(f"model.preset {name!r} is a folder without a config.json; give a preset "
                             f"({', '.join(PRESETS)}), a config file, or a model folder that holds config.json")
        try:
            return auto_config.from_pretrained(str(path), trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ModelError(f"model config folder {path}: {err}") from None
    try:
        return auto_config.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except OSError:
        raise ModelError(
            f"model.preset {name!r} is not a preset ({', '.join(PRESETS)}), not a config file or folder, "
            "and not a model name in the local Hugging Face cache (slope never downloads)"
        ) from None


def max_positions(config) -> int | None:
    """The longest sequence the model's position table allows (None: no limit, e.g. rotary only)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_fits(config, vocab_size: int, seq_len: int) -> None:
    """Errors for a tokenizer the embedding table cannot hold or a sequence longer than the positions."""
    if vocab_size > config.vocab_size:
        raise ModelError(
            f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {config.vocab_size}; "
            "use a smaller tokenizer (tokenizer.vocab_size) or a model config with a larger vocab_size"
        )
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ModelError(
            f"train.seq_len={seq_len} is longer than the model's maximum of {limit} positions; "
            "lower train.seq_len or raise model.max_seq_len"
        )


def build_model(config) -> nn.Module:
    """A randomly initialised causal LM from `config` (seed the global RNG first for reproducibility)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ModelError(f"cannot build a causal language model from this config: {err}") from None


def scale_block_linears(model: nn.Module, scale: float) -> int:
    """Multiply the initial weights of the decoder blocks' linear layers by `scale`; returns how many.

    `model.linear_init_scale`: at 0.7071, dense's default (docs/methods.md), a dense run starts with its
    block outputs at the scale dropping half of the weights at random leaves (√½ of the output). The
    embeddings, the LM head and the biases are untouched; scale 1 changes nothing (not even a copy).
    """
    if scale == 1.0:
        return 0
    from slope.linear import is_conv1d
    from slope.train.distributed import decoder_blocks

    blocks = decoder_blocks(model)
    if blocks is None:
        raise ModelError(f"model.linear_init_scale={scale}: {type(model).__name__} has no decoder blocks to scale")
    layers = [m for m in blocks.modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(scale)
    return len(layers)
