"""The pretraining loop of `slope train`.

One run: prepare data -> build and convert the model -> train with AdamW + warm-up/cosine, logging,
periodic evaluation and atomic checkpoints -> final evaluation, curves and summary.json. Resuming
restores weights, optimizer, sampler and RNG states, so on CPU the continued run is bit-identical to
an uninterrupted one.

Under torchrun the same loop runs on every rank (`slope.train.distributed`): each rank trains on its
slice of the global batch through a DDP or FSDP2 wrapper, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from slope.backends import backend_summary
from slope.convert import slope_layers
from slope.devices import half_dtype, resolve_device
from slope.io import checkpoint
from slope.io.format import CHECKPOINTS_DIR, TOKENIZER_DIR, WEIGHTS_FILE
from slope.linear import track_steps
from slope.train import distributed, models, runconfig
from slope.train.data import DataError
from slope.train.evaluation import causal_lm_loss, evaluate
from slope.train.logs import MetricsLog, read_metrics
from slope.train.methods import count_params, get_method
from slope.train.prepare import prepare_data, tokenize_source
from slope.train.runconfig import ConfigError, RunConfig

log = logging.getLogger("slope")


class TrainingFailed(Exception):
    """The run stopped on its own (non-finite loss, out of memory); the message says what is kept."""


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was written, the run can be resumed."""


# ---- set-up helpers -------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as err:
        raise ConfigError(f"config key 'run.device': {err}") from None


def pick_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        # bf16 autocast gave no gain on CPU (measured); a GPU computes in its 16-bit dtype
        return half_dtype(device) if device.type == "cuda" else None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("run.precision=fp16 is not supported on CPU; use fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def pick_threads(setting: int) -> int:
    """torch's CPU threads for this process: `setting`, or for 0 the cores not busy with other work.

    On a shared 2-core machine torch's default (one thread per core) ran the tiny run at 145 tokens/s
    against about 2,900 with one thread: threads that wait on cores another process holds spin in vain.
    So "auto" takes the cores left free by the 1-minute load average, divided among this machine's
    processes of the run (torchrun's LOCAL_WORLD_SIZE), and never more than torch's default.
    """
    if setting > 0:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    free = max(1, round(cores - busy))
    return max(1, min(torch.get_num_threads(), free // local))


def apply_threads(setting: int) -> int:
    """Set torch's CPU threads from run.threads (see pick_threads), log it, and return the count."""
    threads = pick_threads(setting)
    torch.set_num_threads(threads)
    log.info("torch CPU threads: %d%s", threads, " (run.threads = auto)" if not setting else "")
    return threads


def preflight(cfg: RunConfig) -> torch.device:
    """Every check that needs no data, tokenizer or weights, so a bad run fails in seconds, not at the end.

    The device and precision, a backend that runs on that device, the data and evaluation sources, the
    model config, and the method's conversion of the model's shapes (on the meta device: no memory).
    Returns the device.
    """
    from slope.train.data import resolve_source

    device = pick_device(cfg.run.device)
    amp_dtype = pick_dtype(cfg.run.precision, device)
    method = get_method(cfg.method.name, cfg.slope, method_options(cfg))
    try:
        method.preflight(device, amp_dtype)  # the method's own rules (e.g. a CUDA-only backend, fp16)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    resolve_source(cfg.data.train, text_column=cfg.data.text_column)
    if cfg.data.val not in ("", "auto"):
        resolve_source(cfg.data.val, text_column=cfg.data.text_column)
    for spec in cfg.eval.sets:
        resolve_source(spec, text_column=cfg.data.text_column)
    # The trained BPE's final size is not known yet; presets round it up to a multiple of 64 anyway.
    model_config = models.model_config(cfg.model, cfg.tokenizer.vocab_size, cfg.train.seq_len)
    with torch.device("meta"):
        model = models.build_model(model_config)
        try:
            method.apply(model)
        except ValueError as err:  # nothing left to sparsify, or an indivisible shape with on_indivisible=error
            raise ConfigError(f"[slope]: {err}") from None
        except NotImplementedError:
            pass  # the shape checks passed; building the sparse storage needs real values, which meta has not
    return device


def method_options(cfg: RunConfig) -> dict:
    """The [method] keys and what a method needs of the loop (grad_accum), for `get_method`."""
    return {**cfg.method.options, "grad_accum": cfg.train.grad_accum}


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to optim.lr over warmup_steps, then cosine down to lr * min_lr_ratio."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; fused on GPU, foreach on CPU unless told otherwise."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    impl = cfg.optim.impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps, **kwargs,
    )


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
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _StopFlag:
    """SIGINT sets a flag the loop checks between steps, so a checkpoint is never half a step.

    A second Ctrl-C raises KeyboardInterrupt at once (the default behaviour).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step, writing a checkpoint (Ctrl-C again to abort at once)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


# ---- the run --------------------------------------------------------------------------------------


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def step(self, clipped: bool) -> None:
        pass

    def close(self) -> None:
        pass


def _tied_aliases(model) -> dict[str, str]:
    """The state_dict names safetensors' save_model leaves out of `model`'s file (one of each tied pair),
    each with the name it shares its tensor with: what it records in the file's metadata."""
    import safetensors.torch

    state = model.state_dict()
    return {removed: kept for kept, group in safetensors.torch._remove_duplicate_names(state).items()
            for removed in group}


@dataclass
class RunResult:
    summary: dict
    run_dir: Path


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
                 dist: distributed.Dist | None = None) -> None:
        """dist: where this process stands in a multi-process run (`distributed.init`); None: joined here."""
        self.cfg, self.run_dir, self.resume, self.progress = cfg, Path(run_dir), resume, progress
        self.config_toml = runconfig.to_toml(cfg)
        self.dist = dist

    def _main_first(self, fn):
        """fn() on rank 0, then on the others: rank 0 writes what they then read (tokenized data)."""
        if self.dist.main:
            result = fn()
            self.dist.barrier()
            return result
        self.dist.barrier()
        return fn()

    # -- set-up --

    def _setup(self) -> None:
        cfg = self.cfg
        self.device = preflight(cfg)
        if self.dist is None:
            self.dist, self._owns_dist = distributed.init(cfg), True
        else:
            self._owns_dist = False
        self.device = self.dist.device  # cuda:LOCAL_RANK under torchrun
        self.amp_dtype = pick_dtype(cfg.run.precision, self.device)
        self.threads = apply_threads(cfg.run.threads)
        if self.resume:
            self.tokenizer, self.train_tokens, self.val_tokens = self._main_first(self._resume_data)
        else:
            self.tokenizer, self.train_tokens, self.val_tokens = self._main_first(lambda: prepare_data(
                self.run_dir / "data", cfg.data.train, cfg.data.val, cfg.data.val_fraction,
                cfg.tokenizer.name, cfg.tokenizer.vocab_size, text_column=cfg.data.text_column,
            ))
        log.info("data: %s training tokens, %s validation tokens, vocabulary %d",
                 f"{len(self.train_tokens):,}", f"{len(self.val_tokens):,}", len(self.tokenizer))

        self.model_config = models.model_config(cfg.model, len(self.tokenizer), cfg.train.seq_len,
                                                eos_token_id=self.tokenizer.eos_token_id)
        models.check_fits(self.model_config, len(self.tokenizer), cfg.train.seq_len)
        torch.manual_seed(cfg.run.seed)
        self.method = get_method(cfg.method.name, cfg.slope, method_options(cfg))
        if self.method.summary_options():
            log.info("method %s: %s", self.method.name,
                     ", ".join(f"{k} = {v}" for k, v in self.method.summary_options().items()))
        self.model = self._build_model(announce=True)
        # what save_model leaves out (one of each tied pair), for the consolidated weights of an FSDP run
        self.tied_aliases = _tied_aliases(self.model)
        self.optimizer = track_steps(build_optimizer(self.model, cfg, self.device))
        self.adapter_step = self.method.adapter_step(cfg.train.max_steps)
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        ckpt, state = None, None
        if self.resume:
            # the newest checkpoint that passes its manifest check; a damaged one is skipped with a warning
            ckpt, state = checkpoint.load_for_resume(self.run_dir)
            self._check_resume(ckpt, state)
            # Adapters joined / a prune happened before this checkpoint: the same structure, the same
            # optimizer group order, then the checkpoint's values are loaded into it (_restore)
            for step in self.method.structure_steps(cfg.train.max_steps):
                if step < state["step"]:
                    self.step = step
                    self.method.before_step(step, cfg.train.max_steps, self.model, self.optimizer,
                                            self._adapter_group(), replay=True)
            self.model.to(self.device)
        self._wrap()
        from slope.train.data import WindowSampler

        self.sampler = WindowSampler(self.train_tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.run.seed,
                                     rank=self.dist.rank, world=self.dist.world)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.dist.world
        log.info("global batch: %d windows per step (train.batch_size %d x train.grad_accum %d x %d process(es))",
                 self.global_batch, cfg.train.batch_size, cfg.train.grad_accum, self.dist.world)
        if self.resume:
            self._restore(ckpt, state)

    def _build_model(self, announce: bool = False):
        """The model as the method trains it, on this rank's device, unwrapped (same seed: same on every rank)."""
        model = models.build_model(self.model_config)
        if announce:
            log.info("model: %s, %s parameters", type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,}")
        scaled = models.scale_block_linears(model, self.cfg.model.linear_init_scale)
        if announce and scaled:
            log.info("model.linear_init_scale %g: scaled the initial weights of %d block linear layers",
                     self.cfg.model.linear_init_scale, scaled)
        try:
            self.method.apply(model)
        except ValueError as err:  # the real vocabulary can give the output layer another shape than preflight's
            raise ConfigError(f"[slope]: {err}") from None
        if self.cfg.train.gradient_checkpointing:
            # non-reentrant: recomputes each block in backward; SlopeLinear's operands are derived from its
            # stored values there again, so the recomputed forward equals the first one
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.to(self.device)

    def _wrap(self) -> None:
        """The DDP / FSDP2 wrapper around self.model (none in a single process); forward_model runs it.

        FSDP shards in place and replaces every parameter, so the optimizer, made with the method's
        groups on the plain model, is made again group for group over the sharded parameters.
        """
        mode = self.dist.mode
        self.wrapped = self.model
        if mode == "ddp":
            self.wrapped = distributed.ddp(self.model, self.dist)
        elif mode == "fsdp":
            groups = distributed.named_groups(self.model, self.optimizer)
            distributed.fully_shard(self.model)
            self.optimizer = track_steps(distributed.regroup(self.model, self.optimizer, groups))
        self.forward_model = torch.compile(self.wrapped) if self.cfg.run.compile else self.wrapped

    def _before_step_sharded(self) -> dict | None:
        """The method's `before_step` on an FSDP model, which cannot take new parameters once sharded.

        The model is gathered (a full state_dict on every rank, once per structure change), built again
        unsharded with the structure changes before this step replayed, given the method's new parameters,
        sharded again; the optimizer state of the old parameters moves over by name where the shapes
        still match (same shards); a replaced parameter (a pruned weight) starts fresh. Chosen over
        adapters made up front and frozen: see docs/distributed.md for the measurement.
        """
        cfg = self.cfg
        old_model, old_optimizer = self.model, self.optimizer
        full = distributed.full_state_dict(old_model)
        with torch.random.fork_rng(devices=[]):  # a fresh init must not move the RNG a single process would not
            model = self._build_model()
            scratch = build_optimizer(model, cfg, self.device)
            for step in self.method.structure_steps(cfg.train.max_steps):
                if step < self.step:  # e.g. adapters after a prune: the pruned structure first
                    self.method.before_step(step, cfg.train.max_steps, model, scratch, self._adapter_group(),
                                            replay=True)
        model.load_state_dict(full, strict=True)
        event = self.method.before_step(self.step, cfg.train.max_steps, model, scratch, self._adapter_group())
        if event is None:
            return None  # the method added nothing this step; the rebuilt copy is dropped
        model.to(self.device)
        groups = distributed.named_groups(model, scratch)
        distributed.fully_shard(model)
        optimizer = track_steps(distributed.regroup(model, scratch, groups))
        old_params = dict(old_model.named_parameters())
        for name, param in model.named_parameters():
            old = old_params.get(name)
            if old is not None and old in old_optimizer.state and old.shape == param.shape:
                optimizer.state[param] = old_optimizer.state[old]
        self.model, self.optimizer = model, optimizer
        self.forward_model = torch.compile(model) if cfg.run.compile else model
        self.wrapped = model
        return event

    def _before_step(self) -> dict | None:
        """The method's hook before each step; new parameters join the wrapper and the optimizer."""
        cfg = self.cfg
        if self.dist.mode == "fsdp" and self.step in self.method.structure_steps(cfg.train.max_steps):
            return self._before_step_sharded()
        # other steps change no parameters (wanda's calibration hooks), so the sharded model itself will do
        event = self.method.before_step(self.step, cfg.train.max_steps, self.model, self.optimizer,
                                        self._adapter_group())
        if event and self.dist.mode == "ddp":
            # DDP fixes at construction which parameters it reduces: wrap again so the new ones are in
            del self.wrapped, self.forward_model
            self._wrap()
        return event

    def _adapter_group(self) -> dict:
        return {"weight_decay": self.cfg.optim.weight_decay, "lr": lr_at(self.step, self.cfg)}

    def _resume_data(self):
        """prepare_data of a resumed run, whose tokenizer must be the one its tokens were made with.

        A missing RUN/data/tokenizer/ is refused rather than trained again, and a damaged one is one line
        (transformers explains over several): the CLI prints it, exit 2.
        """
        cfg, data_dir = self.cfg, self.run_dir / "data"
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

    def _check_resume(self, ckpt: Path, state: dict) -> None:
        """Refuse, in one line, a checkpoint this run cannot continue; warn when the global batch changes."""
        sharded = checkpoint.has_sharded_state(ckpt)
        if sharded and self.dist.mode != "fsdp":
            raise ConfigError(f"{ckpt} was written by an FSDP run (its optimizer state is sharded in "
                              f"{checkpoint.SHARDED_DIR}/): resume it with --run.parallel=fsdp (any number of processes)")
        if not sharded and self.dist.mode == "fsdp":
            raise ConfigError(f"{ckpt} was written without FSDP: resume it with --run.parallel=ddp or none")
        saved = state.get("global_batch")  # absent in checkpoints written before several processes were possible
        per_step = self.cfg.train.grad_accum * self.dist.world
        now = self.cfg.train.batch_size * per_step
        if saved is not None and saved != now:
            per_rank, rest = divmod(saved, per_step)
            log.warning("the checkpoint trained with a global batch of %d windows and this resume has %d "
                        "(train.batch_size x train.grad_accum x world size)%s", saved, now,
                        f"; give --train.batch_size={per_rank} to keep it" if not rest else "")

    def _restore(self, ckpt: Path, state: dict) -> None:
        step = state["step"]
        if self.dist.mode == "fsdp":
            # DCP initialises the optimizer state with a zero step, which the layers count; loading the
            # model afterwards sets their counters back to the checkpoint's
            checkpoint.load_sharded_state(ckpt, self.model, self.optimizer)
        else:
            import safetensors.torch

            safetensors.torch.load_model(self.model, str(ckpt / WEIGHTS_FILE), strict=True,
                                         device=str(self.device))
            self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.method.load_state_dict(state.get("method", {}), self.device)
        self.step, self.tokens_seen, self.train_seconds = step, state["tokens_seen"], state["train_seconds"]
        log.info("resumed from %s (step %d)", ckpt, step)

    # -- pieces of a step --

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _trainer_state(self) -> dict:
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
            "sampler": self.sampler.state_dict(), "rng": rng_state(),
            "scaler": self.scaler.state_dict(), "world_size": self.dist.world, "global_batch": self.global_batch,
            "method": self.method.state_dict(),
        }
        if self.dist.mode != "fsdp":  # FSDP: the optimizer state is sharded in dcp/
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save(self) -> Path:
        """One checkpoint; every rank calls it (rank 0 writes, FSDP ranks add their shards)."""
        weights, sharded = None, None
        if self.dist.mode == "fsdp":
            # collective: every rank gathers each tensor in turn; rank 0 keeps the whole model
            full = distributed.full_state_dict(self.model, cpu=True)
            aliases = self.tied_aliases
            weights = ({name: t.contiguous() for name, t in full.items() if name not in aliases}, aliases) \
                if self.dist.main else None

            def sharded(folder: Path) -> None:
                checkpoint.save_sharded_state(folder, self.model, self.optimizer)
        info = self.method.checkpoint_info(self.model)
        try:
            path = checkpoint.save_checkpoint(
                self.run_dir, self.step, self.model, self.tokenizer, info, self.config_toml,
                self._trainer_state(), self.cfg.checkpoint.keep_last,
                ranks=self.dist if self.dist.world > 1 else None, weights=weights, sharded=sharded,
            )
        except checkpoint.CheckpointWriteError as err:  # disk full: stop with one line, the older ones kept
            raise TrainingFailed(f"{err}; {self._kept_message()}") from None
        if self.dist.main:
            log.info("checkpoint: %s", path)
        return path

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step; (loss, global gradient norm before clipping), the loss averaged over ranks."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # applied to every group, so adapters added later follow the schedule too
        total = 0.0
        for micro in range(cfg.train.grad_accum):
            inputs, targets = self.sampler.next()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            # gradients are averaged over the ranks once per step, on the last micro-step
            with distributed.no_sync(self.wrapped, self.dist.mode, sync=micro == cfg.train.grad_accum - 1):
                with self._autocast():
                    loss = causal_lm_loss(self.forward_model, inputs, targets) / cfg.train.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.item()
        total = self.dist.mean(total)  # every rank sees the same value, so all stop together on a bad one
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            return total, float("nan")
        self.scaler.unscale_(self.optimizer)  # the norm of the true gradients (a no-op without fp16)
        if cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        grad_norm = float(distributed.full_value(norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def _eval_model(self):
        """What evaluation runs: every rank evaluates the same windows, so all agree on the result.

        Not DDP's wrapper (an eval forward needs no gradient sync); FSDP's sharded model itself, whose
        forward gathers the parameters and so must run on every rank.
        """
        return self.forward_model if self.dist.mode != "ddp" else self.model

    def _eval_val(self, stop: _StopFlag | None = None) -> dict:
        # Ctrl-C cuts an eval short only in one process: ranks stopping at different windows would desync
        should_stop = (lambda: stop.requested) if stop and self.dist.world == 1 else None
        return evaluate(
            self._eval_model(), self.val_tokens, seq_len=self.cfg.train.seq_len, batch_size=self.cfg.eval.batch_size,
            max_tokens=self.cfg.eval.max_tokens, device=self.device, autocast=self._autocast,
            progress=False, should_stop=should_stop,
        )

    # -- the loop --

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if getattr(self, "_owns_dist", False):
                self.dist.close()

    def _run(self) -> RunResult:
        start_wall = time.perf_counter()
        self._setup()
        cfg = self.cfg
        finished = self.step >= cfg.train.max_steps  # resumed from the final checkpoint: only the end is left
        # rank 0 alone writes metrics.jsonl and TensorBoard / W&B; the others log nothing. Without a
        # progress bar (--no-progress, or stdout not a terminal) every logged step is one plain line.
        metrics = (MetricsLog(self.run_dir, self.step if self.resume else None, finished=self.resume and finished,
                              logger=cfg.run.logger, plain=not self.progress, config=cfg.to_dict())
                   if self.dist.main else _NoMetrics())
        params = count_params(self.model)
        if self.adapter_step is not None:
            log.info("adapters will be added before step %d of %d", self.adapter_step + 1, cfg.train.max_steps)
        tokens_per_step = self.global_batch * cfg.train.seq_len  # over all ranks
        last_loss = self._logged_loss() if self.resume and finished else None
        backends_reported = False
        try:
            with _StopFlag() as stop, logging_redirect_tqdm(), tqdm(
                total=cfg.train.max_steps, initial=self.step, unit="step",
                disable=not (self.progress and self.dist.main),
                dynamic_ncols=True, desc=f"train {self.method.name}",
            ) as bar:
                while self.step < cfg.train.max_steps:
                    event = self._before_step()
                    if event:
                        log.info("before step %d: %s", self.step + 1, self.method.event_message(event))
                        metrics.write({"kind": "event", **event})
                    t0 = time.perf_counter()
                    try:
                        loss, grad_norm = self._train_step()
                    except Exception as err:
                        if _is_oom(err):
                            raise TrainingFailed(
                                f"out of memory at step {self.step + 1} with train.batch_size={cfg.train.batch_size}, "
                                f"train.seq_len={cfg.train.seq_len}: lower train.batch_size (and raise train.grad_accum "
                                f"to keep the tokens per step); {self._kept_message()}"
                            ) from None
                        raise
                    if not math.isfinite(loss):
                        raise TrainingFailed(
                            f"the loss became {loss} at step {self.step + 1}: training stopped; lower optim.lr or "
                            f"raise optim.warmup_steps; {self._kept_message()}"
                        )
                    dt = time.perf_counter() - t0
                    self.train_seconds += dt
                    self.step += 1
                    self.tokens_seen += tokens_per_step
                    last_loss = loss
                    metrics.step(cfg.optim.grad_clip > 0 and grad_norm > cfg.optim.grad_clip)  # the clip rate's tally
                    if not backends_reported and slope_layers(self.model):
                        # after the first step each layer has chosen its backend (and any dense fallbacks)
                        log.info(backend_summary(slope_layers(self.model)))
                        backends_reported = True
                    lr = self.optimizer.param_groups[0]["lr"]
                    tok_s = tokens_per_step / dt
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    bar.update()
                    if self.step % cfg.train.log_every == 0 or self.step in (1, cfg.train.max_steps):
                        clip = cfg.optim.grad_clip
                        metrics.write({"kind": "train", "step": self.step, "loss": loss, "lr": lr,
                                       "tokens": self.tokens_seen, "tokens_per_s": tok_s, "grad_norm": grad_norm,
                                       "clipped": 1.0 if clip > 0 and grad_norm > clip else 0.0})
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.max_steps:
                        result = self._eval_val(stop)
                        if not stop.requested:  # an eval cut short by Ctrl-C is not a result
                            metrics.write({"kind": "eval", "set": "val", "step": self.step, **result})
                            if self.progress:  # without the bar, the metrics log printed it as a plain line
                                log.info("step %d: val loss %.4f, ppl %.2f, bpb %.4f",
                                         self.step, result["loss"], result["ppl"], result["bpb"])
                    if self.dist.world > 1:
                        stop.requested = self.dist.any(stop.requested)  # Ctrl-C on any rank stops them all here
                    if stop.requested:
                        # Between steps: the checkpoint holds exactly `self.step` complete steps.
                        path = self.save()
                        raise Interrupted(
                            f"interrupted at step {self.step}: checkpoint written to {path}; continue with "
                            f"`slope train --resume {self.run_dir}`"
                        )
                    if self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.max_steps:
                        self.save()
            final_ckpt = self.save()
            summary = self._finish(metrics, params, final_ckpt, last_loss, start_wall)
        finally:
            metrics.close()
        return RunResult(summary, self.run_dir)

    def _logged_loss(self) -> float | None:
        """The training loss metrics.jsonl holds for the resumed step (None if it was not logged)."""
        losses = [r["loss"] for r in read_metrics(self.run_dir) if r.get("kind") == "train" and r.get("step") == self.step]
        return losses[-1] if losses else None

    def _kept_message(self) -> str:
        if not self.dist.main:
            return "rank 0 names the last good checkpoint"
        latest = checkpoint.latest_checkpoint(self.run_dir)
        return f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"

    # -- the end --

    def _finish(self, metrics: MetricsLog, params: dict, final_ckpt: Path, last_loss: float | None,
                start_wall: float) -> dict:
        cfg = self.cfg
        results = {"val": self._eval_val()}
        metrics.write({"kind": "eval", "set": "val", "step": self.step, **results["val"]})
        for spec in cfg.eval.sets:
            tokens = self._main_first(lambda spec=spec: tokenize_source(self.run_dir / "data", "eval", spec,
                                                                        self.tokenizer,
                                                                        text_column=cfg.data.text_column))
            results[spec] = evaluate(
                self._eval_model(), tokens, seq_len=cfg.train.seq_len, batch_size=cfg.eval.batch_size,
                max_tokens=cfg.eval.final_max_tokens, device=self.device, autocast=self._autocast,
                progress=self.progress and self.dist.main, desc=f"eval {spec}",
            )
            metrics.write({"kind": "eval", "set": spec, "step": self.step, **results[spec]})
        if not self.dist.main:
            return {}
        from slope.train.plots import plot_curves

        history = read_metrics(self.run_dir)
        plot_curves(history, self.run_dir / "curves.png", self.adapter_step, title=f"{cfg.run.name} ({self.method.name})")
        summary = {
            "run_dir": str(self.run_dir), "method": self.method.name, "model": type(self.model).__name__,
            "parameters": params, "steps": self.step, "tokens": self.tokens_seen,
            "adapter_step": self.adapter_step, "method_options": self.method.summary_options(),
            "final_train_loss": last_loss, "train_seconds": self.train_seconds,
            "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
            "wall_seconds": time.perf_counter() - start_wall, "device": str(self.device),
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "eval": results, "checkpoint": str(final_ckpt),
            "world_size": self.dist.world, "parallel": self.dist.mode, "global_batch": self.global_batch,
            "threads": self.threads,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary
