"""The pretraining loop of `slope train`.

One run: prepare data -> build and convert the model -> train with AdamW + warm-up/cosine, logging,
periodic evaluation and atomic checkpoints -> final evaluation, curves and summary.json. Resuming
restores weights, optimizer, sampler and RNG states, so on CPU the continued run is bit-identical to
an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
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
from slope.io.format import CHECKPOINTS_DIR, TOKENIZER_DIR
from slope.train import models, runconfig
from slope.train.data import DataError
from slope.train.evaluation import causal_lm_loss, evaluate
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


def preflight(cfg: RunConfig) -> torch.device:
    """Every check that needs no data, tokenizer or weights, so a bad run fails in seconds, not at the end.

    The device and precision, a backend that runs on that device, the data and evaluation sources, the
    model config, and the method's conversion of the model's shapes (on the meta device: no memory).
    Returns the device.
    """
    from slope.config import CUDA_BACKENDS
    from slope.train.data import resolve_source

    device = pick_device(cfg.run.device)
    pick_dtype(cfg.run.precision, device)
    if cfg.method.name == "slope" and cfg.slope.backend in CUDA_BACKENDS and device.type != "cuda":
        raise ConfigError(f"config key 'slope.backend': {cfg.slope.backend!r} needs a CUDA GPU and the run is on "
                          f"{device.type}; use 'auto', 'reference' or 'emulated'")
    resolve_source(cfg.data.train)
    if cfg.data.val not in ("", "auto"):
        resolve_source(cfg.data.val)
    for spec in cfg.eval.sets:
        resolve_source(spec)
    # The trained BPE's final size is not known yet; presets round it up to a multiple of 64 anyway.
    model_config = models.model_config(cfg.model, cfg.tokenizer.vocab_size, cfg.train.seq_len)
    with torch.device("meta"):
        model = models.build_model(model_config)
        try:
            get_method(cfg.method.name, cfg.slope).apply(model)
        except ValueError as err:  # nothing left to sparsify, or an indivisible shape with on_indivisible=error
            raise ConfigError(f"[slope]: {err}") from None
        except NotImplementedError:
            pass  # the shape checks passed; building the sparse storage needs real values, which meta has not
    return device


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


# ---- metrics --------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl (the record) and TensorBoard (for browsing) side by side."""

    def __init__(self, run_dir: Path, resume_step: int | None, finished: bool = False) -> None:
        """finished: the resumed checkpoint is the final one, so its final evaluations are written again."""
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            # Drop what the interrupted run logged after its checkpoint: it is logged again.
            kept = [json.dumps(record) for record in read_metrics(run_dir)
                    if _keep_on_resume(record, resume_step, finished)]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")  # noqa: SIM115 - kept open for the whole run
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        prefix = record.get("kind", "train") + ("/" + record["set"] if "set" in record else "")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def _keep_on_resume(record: dict, step: int, finished: bool) -> bool:
    if record.get("kind") == "event" or (finished and record.get("kind") == "eval"):
        # Periodic evals come before their step's checkpoint, the final ones after the final checkpoint.
        return record.get("step", 0) < step
    return record.get("step", 0) <= step


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a line a kill cut short (or any unreadable line) is left out, with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record, bad = None, bad + 1
        if isinstance(record, dict):
            records.append(record)
    if bad:
        log.warning("%s: left out %d unreadable line(s) (a write cut short by a kill)", path, bad)
    return records


# ---- the run --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    summary: dict
    run_dir: Path


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.run_dir, self.resume, self.progress = cfg, Path(run_dir), resume, progress
        self.config_toml = runconfig.to_toml(cfg)

    # -- set-up --

    def _setup(self) -> None:
        cfg = self.cfg
        self.device = preflight(cfg)
        self.amp_dtype = pick_dtype(cfg.run.precision, self.device)
        if self.resume:
            self.tokenizer, self.train_tokens, self.val_tokens = self._resume_data()
        else:
            self.tokenizer, self.train_tokens, self.val_tokens = prepare_data(
                self.run_dir / "data", cfg.data.train, cfg.data.val, cfg.data.val_fraction,
                cfg.tokenizer.name, cfg.tokenizer.vocab_size,
            )
        log.info("data: %s training tokens, %s validation tokens, vocabulary %d",
                 f"{len(self.train_tokens):,}", f"{len(self.val_tokens):,}", len(self.tokenizer))

        model_config = models.model_config(cfg.model, len(self.tokenizer), cfg.train.seq_len,
                                           eos_token_id=self.tokenizer.eos_token_id)
        models.check_fits(model_config, len(self.tokenizer), cfg.train.seq_len)
        torch.manual_seed(cfg.run.seed)
        self.model = models.build_model(model_config)
        dense_params = sum(p.numel() for p in self.model.parameters())
        self.method = get_method(cfg.method.name, cfg.slope)
        log.info("model: %s, %s parameters", type(self.model).__name__, f"{dense_params:,}")
        try:
            self.method.apply(self.model)
        except ValueError as err:  # the real vocabulary can give the output layer another shape than preflight's
            raise ConfigError(f"[slope]: {err}") from None
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        from slope.train.data import WindowSampler

        self.sampler = WindowSampler(self.train_tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.run.seed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.forward_model = torch.compile(self.model) if cfg.run.compile else self.model
        self.adapter_step = self.method.adapter_step(cfg.train.max_steps)
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        if self.resume:
            self._restore()

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
                                cfg.tokenizer.name, cfg.tokenizer.vocab_size)
        except DataError as err:
            raise DataError(" ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None

    def _restore(self) -> None:
        # the newest checkpoint that passes its manifest check; a damaged one is skipped with a warning
        ckpt, state = checkpoint.load_for_resume(self.run_dir)
        step = state["step"]
        if self.adapter_step is not None and step > self.adapter_step:
            # Adapters joined before this checkpoint: same layers, same optimizer group order.
            self.step = self.adapter_step
            self.method.before_step(self.adapter_step, self.cfg.train.max_steps, self.model, self.optimizer,
                                    self._adapter_group())
            self.model.to(self.device)
        import safetensors.torch

        safetensors.torch.load_model(self.model, str(ckpt / "model.safetensors"), strict=True, device=str(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.train_seconds = step, state["tokens_seen"], state["train_seconds"]
        log.info("resumed from %s (step %d)", ckpt, step)

    # -- pieces of a step --

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _trainer_state(self) -> dict:
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
            "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng_state(),
            "scaler": self.scaler.state_dict(),
        }

    def save(self) -> Path:
        try:
            path = checkpoint.save_checkpoint(
                self.run_dir, self.step, self.model, self.tokenizer, self.method.checkpoint_info(self.model),
                self.config_toml,
                self._trainer_state(), self.cfg.checkpoint.keep_last,
            )
        except checkpoint.CheckpointWriteError as err:  # disk full: stop with one line, the older ones kept
            raise TrainingFailed(f"{err}; {self._kept_message()}") from None
        log.info("checkpoint: %s", path)
        return path

    def _train_step(self) -> float:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # applied to every group, so adapters added later follow the schedule too
        total = 0.0
        for _ in range(cfg.train.grad_accum):
            inputs, targets = self.sampler.next()
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self._autocast():
                loss = causal_lm_loss(self.forward_model, inputs, targets) / cfg.train.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.item()
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            return total
        if cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _eval_val(self, stop: _StopFlag | None = None) -> dict:
        return evaluate(
            self.forward_model, self.val_tokens, seq_len=self.cfg.train.seq_len, batch_size=self.cfg.eval.batch_size,
            max_tokens=self.cfg.eval.max_tokens, device=self.device, autocast=self._autocast,
            progress=False, should_stop=(lambda: stop.requested) if stop else None,
        )

    # -- the loop --

    def run(self) -> RunResult:
        start_wall = time.perf_counter()
        self._setup()
        cfg = self.cfg
        finished = self.step >= cfg.train.max_steps  # resumed from the final checkpoint: only the end is left
        metrics = MetricsLog(self.run_dir, self.step if self.resume else None, finished=self.resume and finished)
        params = count_params(self.model)
        if self.adapter_step is not None:
            log.info("adapters will be added before step %d of %d", self.adapter_step + 1, cfg.train.max_steps)
        tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
        last_loss = self._logged_loss() if self.resume and finished else None
        backends_reported = False
        try:
            with _StopFlag() as stop, logging_redirect_tqdm(), tqdm(
                total=cfg.train.max_steps, initial=self.step, unit="step", disable=not self.progress,
                dynamic_ncols=True, desc=f"train {self.method.name}",
            ) as bar:
                while self.step < cfg.train.max_steps:
                    event = self.method.before_step(self.step, cfg.train.max_steps, self.model, self.optimizer,
                                                    self._adapter_group())
                    if event:
                        log.info("before step %d: added adapters (%s parameters, ranks %s); optimizer now has %d groups",
                                 self.step + 1, f"{event['params']:,}", event["ranks"], event["param_groups"])
                        metrics.write({"kind": "event", **event})
                    t0 = time.perf_counter()
                    try:
                        loss = self._train_step()
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
                    if not backends_reported and slope_layers(self.model):
                        # after the first step each layer has chosen its backend (and any dense fallbacks)
                        log.info(backend_summary(slope_layers(self.model)))
                        backends_reported = True
                    lr = self.optimizer.param_groups[0]["lr"]
                    tok_s = tokens_per_step / dt
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                    bar.update()
                    if self.step % cfg.train.log_every == 0 or self.step in (1, cfg.train.max_steps):
                        metrics.write({"kind": "train", "step": self.step, "loss": loss, "lr": lr,
                                       "tokens": self.tokens_seen, "tokens_per_s": tok_s})
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.train.max_steps:
                        result = self._eval_val(stop)
                        if not stop.requested:  # an eval cut short by Ctrl-C is not a result
                            metrics.write({"kind": "eval", "set": "val", "step": self.step, **result})
                            log.info("step %d: val loss %.4f, ppl %.2f, bpb %.4f",
                                     self.step, result["loss"], result["ppl"], result["bpb"])
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
        latest = checkpoint.latest_checkpoint(self.run_dir)
        return f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"

    # -- the end --

    def _finish(self, metrics: MetricsLog, params: dict, final_ckpt: Path, last_loss: float | None,
                start_wall: float) -> dict:
        cfg = self.cfg
        results = {"val": self._eval_val()}
        metrics.write({"kind": "eval", "set": "val", "step": self.step, **results["val"]})
        for spec in cfg.eval.sets:
            tokens = tokenize_source(self.run_dir / "data", "eval", spec, self.tokenizer)
            results[spec] = evaluate(
                self.forward_model, tokens, seq_len=cfg.train.seq_len, batch_size=cfg.eval.batch_size,
                max_tokens=cfg.eval.final_max_tokens, device=self.device, autocast=self._autocast,
                progress=self.progress, desc=f"eval {spec}",
            )
            metrics.write({"kind": "eval", "set": spec, "step": self.step, **results[spec]})
        from slope.train.plots import plot_curves

        history = read_metrics(self.run_dir)
        plot_curves(history, self.run_dir / "curves.png", self.adapter_step, title=f"{cfg.run.name} ({self.method.name})")
        summary = {
            "run_dir": str(self.run_dir), "method": self.method.name, "model": type(self.model).__name__,
            "parameters": params, "steps": self.step, "tokens": self.tokens_seen,
            "adapter_step": self.adapter_step,
            "final_train_loss": last_loss, "train_seconds": self.train_seconds,
            "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
            "wall_seconds": time.perf_counter() - start_wall, "device": str(self.device),
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "eval": results, "checkpoint": str(final_ckpt),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary
