"""Where a run's metrics go: metrics.jsonl always, plus TensorBoard or W&B, plus plain log lines.

`metrics.jsonl` is the record (one JSON object per line, `{"kind": "train"|"eval"|"event", "step", ...}`);
curves, summaries and resumes read it back with `read_metrics`. TensorBoard and W&B are for browsing:
they get every numeric value of every record, under `kind/key` (`eval/<set>/key` for evaluations).
With `plain`, each train and eval record is also one `logging` line, for logs that are not a terminal
(a batch job, CI), where a progress bar is noise.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from slope.io.format import one_line
from slope.train.runconfig import ConfigError

log = logging.getLogger("slope")

LOGGERS = ("tensorboard", "wandb", "none")
WANDB_ID_FILE = "wandb-id.txt"  # the W&B run id, so a resumed run continues the same W&B run


class MetricsLog:
    """metrics.jsonl (the record), one browsing logger (TensorBoard, W&B or none) and optional plain lines.

    resume_step: the step a resumed run continues from (None for a new run); what the interrupted run
    logged after it is dropped, because it is logged again. finished: the resumed checkpoint is the
    final one, so its final evaluations are written again. config: the run config as a dict, given to
    W&B and read for `train.max_steps` (the "step 40/200" of plain lines).
    """

    def __init__(self, run_dir: Path, resume_step: int | None, finished: bool = False, logger: str = "tensorboard",
                 plain: bool = False, config: dict | None = None) -> None:
        if logger not in LOGGERS:
            raise ConfigError(f"config key 'run.logger' must be one of {', '.join(LOGGERS)}, got {logger!r}")
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [json.dumps(record) for record in read_metrics(run_dir)
                    if _keep_on_resume(record, resume_step, finished)]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.plain = plain
        self.max_steps = ((config or {}).get("train") or {}).get("max_steps")
        # clip flags of the steps since the last plain line: from `step()`, else from the train records
        self._clips: list[bool] = []
        self._stepped = False
        self.sink = None
        if logger == "tensorboard":
            self.sink = _TensorBoard(run_dir, resume_step)
        elif logger == "wandb":
            self.sink = _WandB(run_dir, resume_step, config)
        self.file = open(self.path, "a")  # noqa: SIM115 - kept open for the whole run

    def step(self, clipped: bool) -> None:
        """Note one optimizer step's clipping, so a plain line's clip rate covers every step since the last line."""
        self._stepped = True
        self._clips.append(bool(clipped))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.sink is not None:
            step = record.get("step", 0)
            prefix = record.get("kind", "train") + ("/" + record["set"] if "set" in record else "")
            scalars = {f"{prefix}/{key}": value for key, value in record.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
            if scalars:
                self.sink.write(scalars, step)
        kind = record.get("kind")
        if kind == "train":
            if not self._stepped and "clipped" in record:
                self._clips.append(bool(record["clipped"]))
            if self.plain:
                log.info(self._train_line(record))
            self._clips = []
        elif kind == "eval" and self.plain:
            log.info(eval_line(record))

    def _train_line(self, record: dict) -> str:
        step = f"step {record.get('step', 0)}" + (f"/{self.max_steps}" if self.max_steps else "")
        parts = [step]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if record.get("grad_norm") is not None:
            parts.append(f"grad-norm {record['grad_norm']:.3f}")
        if self._clips:
            parts.append(f"clipped {100 * sum(self._clips) / len(self._clips):.0f}%")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        return " | ".join(parts)

    def close(self) -> None:
        self.file.close()
        if self.sink is not None:
            self.sink.close()


def eval_line(record: dict) -> str:
    """One plain line of an evaluation record: `eval val @ step 50 | loss 5.5340 | ppl 253.16 | bpb 2.4948`."""
    parts = [f"eval {record.get('set', '?')} @ step {record.get('step', 0)}"]
    for key, fmt in (("loss", ".4f"), ("ppl", ".2f"), ("bpb", ".4f")):
        if isinstance(record.get(key), (int, float)):
            parts.append(f"{key} {record[key]:{fmt}}")
    if isinstance(record.get("tokens"), int):
        parts.append(f"{record['tokens']:,} tokens")
    return " | ".join(parts)


class _TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides what an interrupted run wrote after the checkpoint it resumes from
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """One W&B run per slope run, its files under RUN_DIR/wandb; WANDB_MODE (offline, disabled) is W&B's own."""

    def __init__(self, run_dir: Path, resume_step: int | None, config: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("run.logger is 'wandb' but wandb is not installed: pip install 'slope[wandb]' "
                              "(or set run.logger=tensorboard or none)") from None
        id_file = run_dir / WANDB_ID_FILE
        resumed = resume_step is not None and id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)  # W&B run ids are short strings of letters and digits
        project = os.environ.get("WANDB_PROJECT") or "slope"
        # WANDB_MODE read at each start and passed on: wandb reads its environment once per process, so a
        # second run in the same process (a notebook, tests) would otherwise keep the first run's mode.
        mode = os.environ.get("WANDB_MODE") or None
        try:
            self.run = wandb.init(project=project, name=run_dir.name, id=run_id, dir=str(run_dir), config=config,
                                  resume="allow" if resumed else None, mode=mode)
        except Exception as err:  # wandb raises its own types (no login, no network)
            raise ConfigError(f"run.logger is 'wandb' but W&B could not start ({one_line(err)}); set WANDB_MODE=offline "
                              "to log locally, or run.logger=tensorboard") from None
        if not resumed:
            id_file.write_text(run_id + "\n")
        # Our step as the x axis rather than W&B's own counter, which only moves forward: a resumed run
        # logs again the steps after its checkpoint, and those would be dropped.
        self.run.define_metric("step")
        for kind in ("train", "eval", "event"):
            self.run.define_metric(f"{kind}/*", step_metric="step")

    def write(self, scalars: dict, step: int) -> None:
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


def _keep_on_resume(record: dict, step: int, finished: bool) -> bool:
    if record.get("kind") == "event" or (finished and record.get("kind") == "eval"):
        # Periodic evals come before their step's checkpoint, the final ones after the final checkpoint.
        return record.get("step", 0) < step
    return record.get("step", 0) <= step


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a line a kill cut short (or any line that is not a record: not JSON,
    nested thousands deep, no kind or step, a train record without its loss) is left out, with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError; a number of 5,000 digits; nested too deep
            record = None
        if _is_record(record):
            records.append(record)
        else:
            bad += 1
    if bad:
        log.warning("%s: left out %d unreadable line(s) (a write cut short by a kill)", path, bad)
    return records


def _is_record(record) -> bool:
    """What the readers of a record use is there, of its type: `kind`, a `step` count, a train record's `loss`,
    and integers a float holds (the curves plot them; JSON's reach to 10**400 and beyond)."""
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        return False
    step, loss = record.get("step"), record.get("loss")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(record.get("set", ""), str):
        return False
    if any(isinstance(v, int) and not -(2**63) <= v < 2**63 for v in record.values()):
        return False
    return record["kind"] != "train" or (isinstance(loss, int | float) and not isinstance(loss, bool))
