"""The pretraining loop of `slope train`: `Trainer`.

One run: prepare data -> build and convert the model -> train with AdamW + warm-up/cosine, logging,
periodic evaluation and atomic checkpoints -> final evaluation, curves and summary.json. Resuming
restores weights, optimizer, sampler and RNG states, so on CPU the continued run is bit-identical to
an uninterrupted one.

Under torchrun the same loop runs on every rank (`slope.train.distributed`): each rank trains on its
slice of the global batch through a DDP or FSDP2 wrapper, and rank 0 alone writes the run directory.

The loop's parts each have a module: the checks before any data work (`preflight`), the device,
precision and threads (`hardware`), AdamW and its schedule (`optim`), the method's structure changes
(`structure`), continuing from a checkpoint (`resume`), a new run from another's weights (`init_from`), and
how a run stops early (`stopping`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from slope.backends import backend_summary
from slope.convert import slope_layers
from slope.io import checkpoint
from slope.io.format import WEIGHTS_FILE
from slope.linear import track_steps
from slope.train import distributed, init_from, models, runconfig, stopping
from slope.train.evaluation import causal_lm_loss, evaluate
from slope.train.hardware import apply_threads, autocast_dtype
from slope.train.logs import MetricsLog, read_metrics
from slope.train.methods import count_params
from slope.train.optim import build_optimizer, clip_gradients, lr_at, new_group_options, set_lr
from slope.train.preflight import preflight, run_method
from slope.train.prepare import check_validation, prepare_data, tokenize_source
from slope.train.resume import check_resume, resumed_data, rng_state, set_rng_state
from slope.train.runconfig import ConfigError, RunConfig
from slope.train.structure import change_sharded_structure, replay_structure
from slope.train.window_sampler import WindowSampler

log = logging.getLogger("slope")


@dataclass
class RunResult:
    summary: dict
    run_dir: Path


class _NoMetrics:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict) -> None:
        pass

    def step(self, clipped: bool) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """One run of `slope train` in this process: `run()` sets up, trains, evaluates and writes the summary."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
                 dist: distributed.Dist | None = None) -> None:
        """dist: where this process stands in a multi-process run (`distributed.init`); None: joined here."""
        self.cfg, self.run_dir, self.resume, self.progress = cfg, Path(run_dir), resume, progress
        runconfig.validate(cfg)  # a RunConfig built in Python gets its checks and method defaults, as a parsed one
        self.config_toml = runconfig.to_toml(cfg)
        self.dist = dist
        self.init_record: dict | None = None  # what an init_from run took from its source (init_from.load_source)

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
        """Everything before the first step: the checks, this process's place, data, model, optimizer,
        sampler, and on resume the checkpoint's structure and state."""
        preflight(self.cfg)
        self._join_processes()
        if self.cfg.run.init_from and not self.resume:
            # the model first, for the source's tokenizer: one that does not fit is refused before any data work
            source = init_from.find_source(self.cfg)
            self.tokenizer = init_from.source_tokenizer(source)
            self._build_training()
            self.init_record = init_from.load_source(source, self.model, self.optimizer, self.cfg)
            self._load_data(str(source.tokenizer_dir))
        else:
            self._load_data()
            self._build_training()
        ckpt, state = self._resume_point() if self.resume else (None, None)
        self._wrap()
        self._start_sampling()
        if self.resume:
            self._restore(ckpt, state)

    def _join_processes(self) -> None:
        """This process's place in the run, its device (cuda:LOCAL_RANK under torchrun), dtype and threads."""
        if self.dist is None:
            self.dist, self._owns_dist = distributed.init(self.cfg), True
        else:
            self._owns_dist = False
        self.device = self.dist.device
        self.amp_dtype = autocast_dtype(self.cfg.run, self.device)
        self.threads = apply_threads(self.cfg.run.threads)

    def _load_data(self, tokenizer_name: str = "") -> None:
        """The tokenizer and the token files, made by rank 0 first; a resumed run keeps its own."""
        cfg = self.cfg

        def new_run_data():
            return prepare_data(self.run_dir / "data", cfg.data.train, cfg.data.val, cfg.data.val_fraction,
                                tokenizer_name or cfg.tokenizer.name, cfg.tokenizer.vocab_size,
                                text_column=cfg.data.text_column)

        load = partial(resumed_data, cfg, self.run_dir) if self.resume else new_run_data
        self.tokenizer, self.train_tokens, self.val_tokens = self._main_first(load)
        check_validation(self.val_tokens, cfg.train.seq_len)  # every evaluation reads one window: before the model
        log.info("data: %s training tokens, %s validation tokens, vocabulary %d",
                 f"{len(self.train_tokens):,}", f"{len(self.val_tokens):,}", len(self.tokenizer))

    def _build_training(self) -> None:
        """The model config, the method, the model as the method trains it, its optimizer, the counters."""
        cfg = self.cfg
        self.model_config = models.model_config(cfg.model, len(self.tokenizer), cfg.train.seq_len,
                                                eos_token_id=self.tokenizer.eos_token_id)
        models.check_fits(self.model_config, len(self.tokenizer), cfg.train.seq_len)
        torch.manual_seed(cfg.run.seed)
        self.method = run_method(cfg)
        if self.method.summary_options():
            log.info("method %s: %s", self.method.name,
                     ", ".join(f"{k} = {v}" for k, v in self.method.summary_options().items()))
        self.model = self._build_model(announce=True)
        # what save_model leaves out (one of each tied pair), for the consolidated weights of an FSDP run
        self.tied_aliases = distributed.tied_aliases(self.model)
        self.optimizer = track_steps(build_optimizer(self.model, cfg, self.device))
        self.step, self.tokens_seen, self.train_seconds = 0, 0, 0.0

    def _resume_point(self) -> tuple[Path, dict]:
        """The checkpoint to continue from, checked against this run, and the model given its structure.

        The newest checkpoint that passes its manifest check (a damaged one is skipped with a warning).
        Adapters that joined and a prune that happened before it are made again, so the parameters and
        the optimizer's group order match it; its values are loaded afterwards (`_restore`).
        """
        ckpt, state = checkpoint.load_for_resume(self.run_dir)
        check_resume(self.run_dir, self.cfg, self.dist, ckpt)  # the CLI checked the latest before any write
        self.init_record = state.get("init_from")  # its adapters joined before any change of the method's
        init_from.add_source_adapters(self.model, self.optimizer, self.init_record, self.cfg)
        replay_structure(self.method, self.cfg, state["step"], self.model, self.optimizer)
        self.model.to(self.device)
        return ckpt, state

    def _start_sampling(self) -> None:
        """This rank's window sampler, the fp16 loss scaler, and the global batch they add up to."""
        cfg = self.cfg
        self.sampler = WindowSampler(self.train_tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.run.seed,
                                     rank=self.dist.rank, world=self.dist.world)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.dist.world
        log.info("global batch: %d windows per step (train.batch_size %d x train.grad_accum %d x %d process(es))",
                 self.global_batch, cfg.train.batch_size, cfg.train.grad_accum, self.dist.world)

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

        FSDP shards in place, so the optimizer is made again over the sharded parameters.
        """
        self.wrapped = self.model
        if self.dist.mode == "ddp":
            self.wrapped = distributed.ddp(self.model, self.dist)
        elif self.dist.mode == "fsdp":
            self.optimizer = track_steps(distributed.shard_with_optimizer(self.model, self.optimizer))
        self.forward_model = torch.compile(self.wrapped) if self.cfg.run.compile else self.wrapped

    def _restore(self, ckpt: Path, state: dict) -> None:
        """The checkpoint's weights, optimizer, sampler, scaler, generators, method state and counters."""
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

    # -- structure changes --

    def _before_step(self) -> dict | None:
        """The method's hook before each step; new parameters join the wrapper and the optimizer."""
        cfg = self.cfg
        if self.dist.mode == "fsdp" and self.step in init_from.structure_steps(self.method, cfg.train.max_steps,
                                                                                  self.init_record):
            return self._before_step_sharded()
        # other steps change no parameters (wanda's calibration hooks), so the sharded model itself will do
        event = self.method.before_step(self.step, cfg.train.max_steps, self.model, self.optimizer,
                                        new_group_options(self.step, cfg))
        if event and self.dist.mode == "ddp":
            # DDP fixes at construction which parameters it reduces: wrap again so the new ones are in
            del self.wrapped, self.forward_model
            self._wrap()
        return event

    def _before_step_sharded(self) -> dict | None:
        """The method's `before_step` on an FSDP model, rebuilt with the new parameters (see structure.py)."""
        changed = change_sharded_structure(self.method, self.cfg, self.step, self.model, self.optimizer,
                                           self._build_model, self.device)
        if changed is None:
            return None
        event, self.model, self.optimizer = changed
        self.wrapped = self.model
        self.forward_model = torch.compile(self.model) if self.cfg.run.compile else self.model
        return event

    # -- pieces of a step --

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _train_step(self) -> tuple[float, float]:
        """One optimizer step; (loss, global gradient norm before clipping), the loss averaged over ranks."""
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(self.step, cfg))
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
        grad_norm = float(distributed.full_value(clip_gradients(self.model, cfg.optim.grad_clip)))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, grad_norm

    def _checked_step(self) -> tuple[float, float]:
        """`_train_step`, stopping the run in one line on out of memory or a non-finite loss."""
        try:
            loss, grad_norm = self._train_step()
        except Exception as err:
            if stopping.is_out_of_memory(err):
                raise stopping.out_of_memory(self.step + 1, self.cfg, stopping.kept_checkpoint(self.run_dir, self.dist.main)) from None
            raise
        if not math.isfinite(loss):
            raise stopping.non_finite_loss(loss, self.step + 1, stopping.kept_checkpoint(self.run_dir, self.dist.main))
        return loss, grad_norm

    def _eval_model(self):
        """What evaluation runs: every rank evaluates the same windows, so all agree on the result.

        Not DDP's wrapper (an eval forward needs no gradient sync); FSDP's sharded model itself, whose
        forward gathers the parameters and so must run on every rank.
        """
        return self.forward_model if self.dist.mode != "ddp" else self.model

    def _eval_val(self, stop: stopping.StopFlag | None = None) -> dict:
        # Ctrl-C cuts an eval short only in one process: ranks stopping at different windows would desync
        should_stop = (lambda: stop.requested) if stop and self.dist.world == 1 else None
        return evaluate(
            self._eval_model(), self.val_tokens, seq_len=self.cfg.train.seq_len, batch_size=self.cfg.eval.batch_size,
            max_tokens=self.cfg.eval.max_tokens, device=self.device, autocast=self._autocast,
            progress=False, should_stop=should_stop,
        )

    # -- checkpoints --

    def _trainer_state(self) -> dict:
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
            "sampler": self.sampler.state_dict(), "rng": rng_state(),
            "scaler": self.scaler.state_dict(), "world_size": self.dist.world, "global_batch": self.global_batch,
            "method": self.method.state_dict(), "init_from": self.init_record,
        }
        if self.dist.mode != "fsdp":  # FSDP: the optimizer state is sharded in dcp/
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def save(self) -> Path:
        """One checkpoint; every rank calls it (rank 0 writes, FSDP ranks add their shards)."""
        weights, sharded = None, None
        if self.dist.mode == "fsdp":
            weights = distributed.consolidated_weights(self.model, self.tied_aliases, self.dist.main)

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
            raise stopping.TrainingFailed(f"{err}; {stopping.kept_checkpoint(self.run_dir, self.dist.main)}") from None
        if self.dist.main:
            log.info("checkpoint: %s", path)
        return path

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
        self.adapter_step = init_from.adapter_step(self.method, self.cfg.train.max_steps, self.init_record)
        finished = self.step >= self.cfg.train.max_steps  # resumed from the final checkpoint: only the end is left
        # rank 0 alone writes metrics.jsonl and TensorBoard / W&B; the others log nothing. Without a
        # progress bar (--no-progress, or stdout not a terminal) every logged step is one plain line.
        metrics = (MetricsLog(self.run_dir, self.step if self.resume else None, finished=self.resume and finished,
                              logger=self.cfg.run.logger, plain=not self.progress, config=self.cfg.to_dict())
                   if self.dist.main else _NoMetrics())
        params = count_params(self.model)
        if self.adapter_step is not None and self.step <= self.adapter_step:  # not when resumed past it
            log.info("adapters will be added before step %d of %d", self.adapter_step + 1, self.cfg.train.max_steps)
        self.last_loss = self._logged_loss() if self.resume and finished else None
        self._backends_reported = False
        try:
            final_ckpt = self._train_loop(metrics)
            summary = self._finish(metrics, params, final_ckpt, start_wall)
        finally:
            metrics.close()
        return RunResult(summary, self.run_dir)

    def _train_loop(self, metrics) -> Path:
        """Steps until train.max_steps, each followed by its logging, evaluation and checkpoint; the final one."""
        cfg = self.cfg
        with stopping.StopFlag() as stop, logging_redirect_tqdm(), tqdm(
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
                loss, grad_norm = self._checked_step()
                self._record_step(metrics, bar, loss, grad_norm, time.perf_counter() - t0)
                self._between_steps(metrics, stop)
            final = self.save()  # under the handler too: a stop keeps it, and --resume does only the end
            if self.dist.any(stop.requested):
                raise stopping.interrupted(self.step, final, self.run_dir, stop.signum)
            return final

    def _record_step(self, metrics, bar, loss: float, grad_norm: float, seconds: float) -> None:
        """Count a finished step, and show and log it (every train.log_every steps, the first and the last)."""
        cfg = self.cfg
        tokens_per_step = self.global_batch * cfg.train.seq_len  # over all ranks
        self.train_seconds += seconds
        self.step += 1
        self.tokens_seen += tokens_per_step
        self.last_loss = loss
        clipped = cfg.optim.grad_clip > 0 and grad_norm > cfg.optim.grad_clip
        metrics.step(clipped)  # the clip rate's tally
        if not self._backends_reported and slope_layers(self.model):
            # after the first step each layer has chosen its backend (and any dense fallbacks)
            log.info(backend_summary(slope_layers(self.model)))
            self._backends_reported = True
        lr = self.optimizer.param_groups[0]["lr"]
        tok_s = tokens_per_step / seconds
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
        bar.update()
        if self.step % cfg.train.log_every == 0 or self.step in (1, cfg.train.max_steps):
            metrics.write({"kind": "train", "step": self.step, "loss": loss, "lr": lr,
                           "tokens": self.tokens_seen, "tokens_per_s": tok_s, "grad_norm": grad_norm,
                           "clipped": 1.0 if clipped else 0.0})

    def _between_steps(self, metrics, stop: stopping.StopFlag) -> None:
        """The periodic evaluation and checkpoint, and Ctrl-C: a checkpoint, then Interrupted."""
        cfg = self.cfg
        before_end = self.step < cfg.train.max_steps  # the end evaluates and checkpoints in _run
        if cfg.eval.every and self.step % cfg.eval.every == 0 and before_end:
            result = self._eval_val(stop)
            if not stop.requested:  # an eval cut short by Ctrl-C is not a result
                metrics.write({"kind": "eval", "set": "val", "step": self.step, **result})
                if self.progress:  # without the bar, the metrics log printed it as a plain line
                    log.info("step %d: val loss %.4f, ppl %.2f, bpb %.4f",
                             self.step, result["loss"], result["ppl"], result["bpb"])
        if self.dist.world > 1:
            stop.requested = self.dist.any(stop.requested)  # a signal to any rank stops them all here
        if stop.requested:
            # Between steps: the checkpoint holds exactly `self.step` complete steps.
            raise stopping.interrupted(self.step, self.save(), self.run_dir, stop.signum)
        if self.step % cfg.checkpoint.every == 0 and before_end:
            self.save()

    def _logged_loss(self) -> float | None:
        """The training loss metrics.jsonl holds for the resumed step (None if it was not logged)."""
        losses = [r["loss"] for r in read_metrics(self.run_dir) if r.get("kind") == "train" and r.get("step") == self.step]
        return losses[-1] if losses else None

    # -- the end --

    def _finish(self, metrics: MetricsLog, params: dict, final_ckpt: Path, start_wall: float) -> dict:
        """The final evaluation on every rank; curves and summary.json on rank 0, which returns the summary."""
        results = self._final_eval(metrics)
        if not self.dist.main:
            return {}
        from slope.train.plots import plot_curves

        cfg = self.cfg
        plot_curves(read_metrics(self.run_dir), self.run_dir / "curves.png", self.adapter_step,
                    title=f"{cfg.run.name} ({self.method.name})")
        summary = {
            "run_dir": str(self.run_dir), "method": self.method.name, "model": type(self.model).__name__,
            "parameters": params, "steps": self.step, "tokens": self.tokens_seen,
            "adapter_step": self.adapter_step, "method_options": self.method.summary_options(),
            "final_train_loss": self.last_loss, "train_seconds": self.train_seconds,
            "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
            "wall_seconds": time.perf_counter() - start_wall, "device": str(self.device),
            "precision": str(self.amp_dtype or torch.float32).replace("torch.", ""),
            "eval": results, "checkpoint": str(final_ckpt),
            "world_size": self.dist.world, "parallel": self.dist.mode, "global_batch": self.global_batch,
            "threads": self.threads, "init_from": init_from.summary_of(self.init_record),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _final_eval(self, metrics) -> dict:
        """The validation set (as periodically) and each of eval.sets (eval.final_max_tokens each)."""
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
        return results
