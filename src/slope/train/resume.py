"""Continuing a run from a checkpoint: the checks that refuse one, the run's own tokenizer and tokens,
and the random generators' state that makes the continuation exact.

On CPU a resumed run is bit-identical to an uninterrupted one: the checkpoint holds every generator's
position (`rng_state`), and the model gets the structure it was written with
(`slope.train.structure.replay_structure`) before the checkpoint's values are loaded into it
(`Trainer._restore`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from slope.io.format import CHECKPOINTS_DIR, SHARDED_DIR, TOKENIZER_DIR
from slope.io.sharded_state import has_sharded_state
from slope.train.data_error import DataError
from slope.train.distributed import Dist
from slope.train.prepare import prepare_data
from slope.train.runconfig import ConfigError, RunConfig

log = logging.getLogger("slope")


def rng_state() -> dict:
    """Every generator's position as tensors and plain data (a checkpoint stores it without pickle)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached_gaussian],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Every generator back at the position `rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resumed_data(cfg: RunConfig, run_dir: Path):
    """prepare_data of a resumed run, whose tokenizer must be the one its tokens were made with.

    A missing RUN/data/tokenizer/ is refused rather than trained again, and a damaged one is one line
    (transformers explains over several): the CLI prints it, exit 2.
    """
    data_dir = run_dir / "data"
    tok_dir = data_dir / "tokenizer"
    if (data_dir / "train.json").is_file() and not tok_dir.is_dir():
        raise DataError(
            f"tokenizer {tok_dir} is missing, but {data_dir / 'train.json'} was tokenized with it; "
            f"copy it back from a checkpoint ({CHECKPOINTS_DIR}/step_XXXXXXXX/{TOKENIZER_DIR}/) to resume"
        )
    try:
        return prepare_data(data_dir, cfg.data.train, cfg.data.val, cfg.data.val_fraction,
                            cfg.tokenizer.name, cfg.tokenizer.vocab_size, text_column=cfg.data.text_column)
    except DataError as err:
        raise DataError(" ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None


def check_resume(ckpt: Path, state: dict, cfg: RunConfig, dist: Dist) -> None:
    """Refuse, in one line, a checkpoint this run cannot continue; warn when the global batch changes."""
    sharded = has_sharded_state(ckpt)
    if sharded and dist.mode != "fsdp":
        raise ConfigError(f"{ckpt} was written by an FSDP run (its optimizer state is sharded in "
                          f"{SHARDED_DIR}/): resume it with --run.parallel=fsdp (any number of processes)")
    if not sharded and dist.mode == "fsdp":
        raise ConfigError(f"{ckpt} was written without FSDP: resume it with --run.parallel=ddp or none")
    saved = state.get("global_batch")  # absent in checkpoints written before several processes were possible
    per_step = cfg.train.grad_accum * dist.world
    resumed = cfg.train.batch_size * per_step
    if saved is not None and saved != resumed:
        per_rank, rest = divmod(saved, per_step)
        log.warning("the checkpoint trained with a global batch of %d windows and this resume has %d "
                    "(train.batch_size x train.grad_accum x world size)%s", saved, resumed,
                    f"; give --train.batch_size={per_rank} to keep it" if not rest else "")
