"""Tiny models, an in-test tokenizer and training-checkpoint directories for the export/inference tests.

The checkpoint layout is the one `slope train` writes (RUN_DIR/checkpoints/latest naming
step_XXXXXXXX/ with model.safetensors, config.json, slope.json, tokenizer/, the trainer state and
manifest.json), written by slope.io's one writer, so these tests do not depend on the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import slope

TEXT = [
    "From fairest creatures we desire increase,",
    "That thereby beauty's rose might never die,",
    "But as the riper should by time decease,",
    "His tender heir might bear his memory:",
    "But thou contracted to thine own bright eyes,",
    "Feed'st thy light's flame with self-substantial fuel,",
]


def make_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_config(family: str, vocab_size: int = 320):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=128,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
    if family == "neox":  # transformers 5 saves its head, `lm_head`, under the checkpoint name `embed_out`
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
        )
    raise ValueError(family)


# Not the defaults (A ~ N(0, 1), scale 1/r): what is saved and loaded must carry the configured values;
# a reader falling back to the defaults is caught.
ADAPTER_CONFIG = {"adapter_init": "kaiming", "adapter_scale": 0.37}


def tiny_model(
    family: str, adapters: bool = False, cfg: slope.SlopeConfig | None = None, seed: int = 0,
    per_layer_scales: bool = False,
):
    """A sparsified tiny model in which every stored number matters.

    - Every bias (GPT-2's and OPT's linear and LayerNorm biases; LLaMA has none) is random: Hugging
      Face initialises them to zero, and an export that wrote zeros instead would then change nothing.
    - Adapters (rank 4) follow `cfg`, by default ADAPTER_CONFIG: kaiming A, scale 0.37. B is random,
      not the zero of insertion, so the adapters change the output.
    - per_layer_scales: each layer gets its own explicit scale (0.5, 0.6, ...), as
      `SlopeLinear.add_adapter(scale=...)` allows, which no config derives: only a loader that reads
      the stored scale gets it back. Training checkpoints re-derive the scale from the config (as
      training does), so such a model is only for `save_compressed`.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    slope.sparsify(model, cfg or slope.SlopeConfig(backend="reference", **ADAPTER_CONFIG))
    if adapters:
        for i, (_, layer) in enumerate(slope.slope_layers(model)):
            layer.add_adapter(4, scale=0.5 + 0.1 * i if per_layer_scales else None)
            with torch.no_grad():
                layer.adapter_b.normal_(0, 0.5)
    return model.eval()


def write_training_checkpoint(run_dir: Path, model, tokenizer, step: int = 10, run_config: str | None = None) -> Path:
    """The run-directory layout of `slope train`, one checkpoint; returns the run directory.

    run_config: the checkpoint's config.toml; None leaves it out (so readers fall back to the model's own
    settings, e.g. `slope eval`'s window), and the manifest lists the files that are there.
    """
    from slope.io.checkpoint import save_checkpoint
    from slope.io.format import RUN_CONFIG_FILE

    layers = slope.slope_layers(model)
    ranks = {layer.rank for _, layer in layers}
    info = {
        "method": "slope" if layers else "dense",
        "slope_config": layers[0][1].config.to_dict() if layers else None,
        "adapters": bool(layers) and max(ranks) > 0,
        "adapter_rank": max(ranks) if layers and max(ranks) else None,
    }
    ckpt = save_checkpoint(run_dir, step, model, tokenizer, info, run_config or "", resumable_state(step, model),
                           keep_last=1)
    if run_config is None:
        (ckpt / RUN_CONFIG_FILE).unlink()
        reseal(ckpt)
    return run_dir


def resumable_state(step: int, model=None) -> dict:
    """A trainer state of the shape `slope train` writes: what a resume reads of it
    (slope.io.trainer_state.check_resumable) is there, each of its type."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.RandomState(step).get_state()
    params = list(model.parameters()) if model is not None else [torch.zeros(1, requires_grad=True)]
    return {
        "step": step, "tokens_seen": 16 * step, "train_seconds": 0.5 * step,
        "sampler": {"generator": torch.Generator().manual_seed(step).get_state(), "batches": step},
        "rng": {"torch": torch.Generator().manual_seed(step + 1).get_state(), "python": random.Random(step).getstate(),
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]},
        "scaler": {}, "world_size": 1, "global_batch": 8, "method": {},
        "optimizer": torch.optim.AdamW(params).state_dict(),
    }


class _Payload:
    """Unpickling this creates the marker file: what a crafted trainer_state.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def format1_run(run: Path, source: Path, marker: Path) -> Path:
    """A copy of the run `source` as slope 0.1 wrote it: slope.json format 1, no manifest, the trainer state
    pickled in trainer_state.pt (here a payload that creates `marker` if it is ever unpickled)."""
    import pickle
    import shutil

    shutil.copytree(source, run)
    for ckpt in (run / "checkpoints").glob("step_*"):
        for name in ("manifest.json", "trainer_state.json", "trainer_state.safetensors"):
            (ckpt / name).unlink()
        (ckpt / "trainer_state.pt").write_bytes(pickle.dumps({"step": 3, "x": _Payload(marker)}))
        info = json.loads((ckpt / "slope.json").read_text())
        (ckpt / "slope.json").write_text(json.dumps({**info, "format": 1}))
    return run


def reseal(checkpoint_dir: Path) -> None:
    """Write a checkpoint's manifest.json again for the files now there: a file changed on purpose then
    passes the checksums, so the checks behind them (the loader's own) are what a test reaches."""
    from slope.io.format import CHECKPOINT_FORMAT, MANIFEST_FILE, file_digests

    files = file_digests(checkpoint_dir, skip=(MANIFEST_FILE,))
    (checkpoint_dir / MANIFEST_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "files": files}, indent=1))


def reseal_export(export_dir: Path, relist: bool = True) -> None:
    """Write a compressed export's checksums again: with `relist`, the list of its files (sizes and SHA-256),
    then slope_model.json's own checksum. A file changed on purpose then passes them, so the checks behind
    them (the loader's own) are what a test reaches."""
    from slope.io.format import META_CHECKSUM_KEY, META_FILE, file_digests, sealed_json

    meta = json.loads((export_dir / META_FILE).read_text())
    meta.pop(META_CHECKSUM_KEY, None)
    if relist:
        meta["files"] = file_digests(export_dir, skip=(META_FILE,))
    (export_dir / META_FILE).write_text(sealed_json(meta, META_CHECKSUM_KEY))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
