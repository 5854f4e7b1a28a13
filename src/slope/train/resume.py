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

from slope.io.checkpoint import latest_checkpoint
from slope.io.format import (
    CHECKPOINTS_DIR,
    RUN_CONFIG_FILE,
    SHARDED_DIR,
    TOKENIZER_DIR,
    TRAINER_STATE_FILE,
    FormatError,
    read_json,
)
from slope.io.sharded_state import has_sharded_state
from slope.train import runconfig
from slope.train.data_error import DataError
from slope.train.distributed import Dist
from slope.train.prepare import prepare_data
from slope.train.runconfig import ConfigError, RunConfig
from slope.train.token_files import vocab_digest
from slope.train.tokenizing import pretrained_tokenizer

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


# Overrides --resume accepts, and the only keys in which RUN/config.toml may differ from the config a
# checkpoint was trained with. They change what is logged, kept or evaluated at the end, or how the
# steps are spread over processes, never the steps themselves, so the continued run is still the run
# its checkpoint recorded. train.batch_size is per process: a resume on another number of processes
# gives it to keep the global batch, and only to keep it (`_check_global_batch`).
RESUME_OVERRIDES = ("eval.sets", "checkpoint.keep_last", "train.log_every", "run.parallel", "run.dist_timeout",
                    "train.batch_size")


def check_resume(run_dir: Path, cfg: RunConfig, dist: Dist, ckpt: Path | None = None) -> None:
    """Refuse, in one line naming what differs, a resume that would not continue its run exactly.

    `ckpt` is the checkpoint to continue from (default: the one `checkpoints/latest` names; nothing is
    hashed here, the manifest check comes when it is loaded). Refused: a sharded checkpoint without FSDP
    or the reverse; a key of `cfg` outside RESUME_OVERRIDES that differs from the checkpoint's
    config.toml (RUN/config.toml edited by hand); another global batch; a RUN/data/tokenizer that is not
    the one the checkpoint and RUN/data/train.bin were made with. Cheap enough to run before any write.
    """
    ckpt = ckpt or latest_checkpoint(run_dir)
    if ckpt is None:
        return  # load_for_resume says so
    sharded = has_sharded_state(ckpt)
    if sharded and dist.mode != "fsdp":
        raise ConfigError(f"{ckpt} was written by an FSDP run (its optimizer state is sharded in "
                          f"{SHARDED_DIR}/): resume it with --run.parallel=fsdp (any number of processes)")
    if not sharded and dist.mode == "fsdp":
        raise ConfigError(f"{ckpt} was written without FSDP: resume it with --run.parallel=ddp or none")
    _check_config(ckpt, cfg, run_dir)
    _check_global_batch(ckpt, cfg, dist)
    _check_tokenizer(ckpt, run_dir)


def _check_config(ckpt: Path, cfg: RunConfig, run_dir: Path) -> None:
    """Every key outside RESUME_OVERRIDES as the checkpoint was trained with it."""
    try:
        trained = runconfig.resolve(str(ckpt / RUN_CONFIG_FILE)).to_dict()
    except (ConfigError, OSError):
        return  # a damaged checkpoint config fails the manifest check when the checkpoint is loaded
    given = cfg.to_dict()
    changed = [(f"{section}.{key}", value, given[section].get(key))
               for section, values in trained.items() for key, value in values.items()
               if f"{section}.{key}" not in RESUME_OVERRIDES and given[section].get(key) != value]
    changed += [(f"{section}.{key}", None, value) for section, values in given.items() for key, value in values.items()
                if key not in trained.get(section, {}) and f"{section}.{key}" not in RESUME_OVERRIDES]
    if not changed:
        return
    key, was, now = changed[0]
    others = f" (also {', '.join(k for k, _, _ in changed[1:])})" if len(changed) > 1 else ""
    raise ConfigError(
        f"--resume: {run_dir / RUN_CONFIG_FILE} sets {key} = {now!r}, but {ckpt.name} was trained with {was!r}"
        f"{others}; a resume continues the run as it was trained: set it back, or train on with the new value "
        f"as a new run from this one (--init-from {run_dir} --{key}=...)")


def _check_global_batch(ckpt: Path, cfg: RunConfig, dist: Dist) -> None:
    """The windows per optimizer step as the checkpoint trained: the same steps, the same data order."""
    try:
        saved = read_json(ckpt / TRAINER_STATE_FILE, "the trainer state").get("global_batch")
    except (FormatError, AttributeError):
        return  # the trainer state's own checks report it when the checkpoint is loaded
    if not isinstance(saved, int) or isinstance(saved, bool):
        return
    per_step = cfg.train.grad_accum * dist.world
    resumed = cfg.train.batch_size * per_step
    if saved == resumed:
        return
    per_rank, rest = divmod(saved, per_step)
    fix = (f"give --train.batch_size={per_rank} to keep it" if not rest else
           f"no train.batch_size keeps it on {dist.world} process(es): resume on a number of processes that divides "
           f"{saved // cfg.train.grad_accum if saved % cfg.train.grad_accum == 0 else saved}")
    raise ConfigError(f"--resume: {ckpt.name} trained with a global batch of {saved} windows per step and this "
                      f"resume would train with {resumed} (train.batch_size {cfg.train.batch_size} x "
                      f"train.grad_accum {cfg.train.grad_accum} x {dist.world} process(es)); {fix}")


def _check_tokenizer(ckpt: Path, run_dir: Path) -> None:
    """RUN/data/tokenizer is the one the checkpoint learned and the training tokens were made with."""
    tok_dir, tokens = run_dir / "data" / TOKENIZER_DIR, run_dir / "data" / "train.json"
    if not tok_dir.is_dir():
        return  # resumed_data refuses a missing one, naming where to copy it from
    ours = vocab_digest(pretrained_tokenizer(str(tok_dir)))
    restore = f"copy {ckpt / TOKENIZER_DIR} back to {tok_dir} to resume"
    if (ckpt / TOKENIZER_DIR).is_dir() and vocab_digest(pretrained_tokenizer(str(ckpt / TOKENIZER_DIR))) != ours:
        raise DataError(f"--resume: {tok_dir} is not the tokenizer {ckpt.name} was trained with (another vocabulary, "
                        f"sha256 {ours[:12]}); {restore}")
    try:
        recorded = read_json(tokens, "token file metadata")["tokenizer"]["vocab_sha256"]
    except (FormatError, KeyError, TypeError):
        return  # no record (a prepared source) or a damaged one, which TokenFile reports
    if recorded != ours:
        raise DataError(f"--resume: {tok_dir} is not the tokenizer {tokens} records (vocabulary sha256 "
                        f"{str(recorded)[:12]}, this one's {ours[:12]}); {restore}")
