"""`slope train`: pretrain a model from a TOML run file plus --section.key=value overrides."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path

from slope.cli.errors import UserError
from slope.train import runconfig
from slope.train.runconfig import ConfigError

log = logging.getLogger("slope")

EPILOG = """Every config key can be set on the command line as --section.key=value, after the run file
(sections: run, model, data, tokenizer, method, slope, optim, train, eval, checkpoint; see
configs/default.toml and docs/training.md).

examples:
  slope train                                   the default run (SLoPe 2:4, 8.4M LLaMA, Shakespeare, < 10 min on CPU)
  slope train --method dense                    the same run, dense
  slope train --config tiny                     a smoke run in seconds
  slope train --optim.lr=1e-3 --train.max_steps=500 --slope.adapter_start=0.9
  slope train --resume runs/shakespeare-slope-20260101-120000
  slope train --init-from runs/shakespeare-slope-20260101-120000 --train.max_steps=1000
                                                a new run from that run's weights and masks, new schedule
  torchrun --nproc_per_node=2 -m slope train --config tiny     two processes, DDP (see docs/distributed.md)
  torchrun --nproc_per_node=2 -m slope train --run.parallel=fsdp
"""


def register(subparsers, name: str, help_text: str) -> None:
    import argparse

    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE_OR_NAME",
                   help="TOML run file, or a shipped config: default, tiny, gpu-gpt2-small")
    p.add_argument("--method", choices=None, help="the training method: dense, slope, srste or wanda (docs/methods.md; same as --method.name)")
    p.add_argument("--run-dir", type=Path, help="run directory (must not exist); default runs/<name>-<method>-<time>")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint, exactly as it was trained: only --eval.sets, "
                        "--checkpoint.keep_last, --train.log_every, --run.parallel, --run.dist_timeout and "
                        "--train.batch_size (to keep the global batch) may be given with it")
    p.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                   help="a new run that starts from another run's weights, masks and adapters (its latest "
                        "checkpoint, or a checkpoint folder) and its tokenizer, with a new optimizer and schedule "
                        "from step 0 (same as --run.init_from; docs/training.md)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one plain line per logged step instead (the default when the output "
                        "is not a terminal)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, run file, overrides) as TOML and exit; nothing is "
                        "trained or written")
    p.set_defaults(func=run, accepts_extra=True)


LOCK_FILE = ".lock"


def _new_run_dir(cfg: runconfig.RunConfig, explicit: Path | None) -> Path:
    if explicit is not None:
        if explicit.exists() and not _killed_before_its_first_checkpoint(explicit):
            raise UserError(f"run directory {explicit} already exists; continue it with --resume {explicit} "
                            "or choose another --run-dir")
        return explicit
    if cfg.run.name in ("", ".", "..") or Path(cfg.run.name).name != cfg.run.name:
        raise UserError(f"run.name {cfg.run.name!r} must be a plain name (no '/' or '..'): it names the run's "
                        f"folder inside run.out_dir ({cfg.run.out_dir}); give --run-dir for another place")
    base = Path(cfg.run.out_dir) / f"{cfg.run.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _resolve(args) -> tuple[runconfig.RunConfig, Path, bool]:
    if args.resume is not None:
        if args.init_from is not None:
            raise UserError("--resume continues a run from its own checkpoint and --init-from starts a new run "
                            "from another run's weights; give one of them")
        if args.config or args.method or args.run_dir:
            raise UserError("--resume continues a run with its saved config; give no --config, --method or "
                            "--run-dir with it")
        from slope.train.resume import RESUME_OVERRIDES

        for key in runconfig.parse_overrides(args.extra):
            if key not in RESUME_OVERRIDES:
                raise UserError(_resume_refusal(key, args.resume))
        from slope.io.format import RUN_CONFIG_FILE

        _check_resume_target(args.resume)
        return runconfig.resolve(str(args.resume / RUN_CONFIG_FILE), args.extra), args.resume, True
    extra = list(args.extra)
    if args.method:
        extra.append(f"--method.name={args.method}")
    if args.init_from is not None:
        extra.append(f"--run.init_from={args.init_from}")
    cfg = runconfig.resolve(args.config, extra)
    return cfg, _new_run_dir(cfg, args.run_dir), False


def _check_resume_target(path: Path) -> None:
    """Refuse, before anything is written, a --resume target that is not a run with a checkpoint: a
    checkpoint folder (its manifest would no longer match), any folder that happens to hold a config.toml."""
    from slope.io import checkpoint
    from slope.io.format import CHECKPOINTS_DIR, MANIFEST_FILE, RUN_CONFIG_FILE

    if not path.is_dir():
        raise UserError(f"--resume {path}: no such run directory")
    if (path / MANIFEST_FILE).is_file():
        raise UserError(f"--resume {path}: this is a checkpoint, not a run directory; resume its run "
                        f"(--resume {path.parent.parent}), or start a new run from it with --init-from {path}")
    if not (path / RUN_CONFIG_FILE).is_file() or not (path / CHECKPOINTS_DIR).is_dir():
        raise UserError(f"{path} is not a run directory (it needs a config.toml and a {CHECKPOINTS_DIR}/ folder)")
    if not checkpoint.list_checkpoints(path):
        raise UserError(f"{path} has no checkpoint to resume from (its run stopped before the first one); start "
                        f"it again with the same settings and --run-dir {path}")


def _killed_before_its_first_checkpoint(path: Path) -> bool:
    """A run folder left by a run killed (SIGKILL, a power cut) before its first checkpoint: its config,
    maybe some tokens, nothing to resume. It is started again in place; a live run holding it is not."""
    from slope.io.format import CHECKPOINTS_DIR, RUN_CONFIG_FILE

    checkpoints = path / CHECKPOINTS_DIR
    if not (path / RUN_CONFIG_FILE).is_file() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return False
    if (path / LOCK_FILE).is_file():
        try:
            with run_lock(path):  # taken and let go at once: only asking whether a live run holds it
                pass
        except UserError:
            return False
    log.warning("run directory %s holds a run stopped before its first checkpoint: starting it again", path)
    shutil.rmtree(path)
    return True


def _resume_refusal(key: str, run_dir: Path) -> str:
    from slope.train.resume import RESUME_OVERRIDES

    message = (f"--resume cannot change '{key}': it would change the run's training; the keys a resume may "
               f"change are {', '.join(RESUME_OVERRIDES)}")
    if key == "train.max_steps":
        # the steps already taken followed the cosine schedule of the old max_steps
        message += (f"; to train a run further with a new schedule, start a new run from its weights: "
                    f"--init-from {run_dir} --train.max_steps=N")
    return message


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on `run_dir` while one process trains in it.

    flock, not the lock file's existence, is the lock: the OS releases it when its process ends, however it
    ends, so a lock file a killed run left behind is simply taken over. The file names the holder.
    """
    import fcntl
    import os
    import socket

    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"run directory {run_dir} is in use by {holder} (lock file {path}); wait for that "
                            "run to end or stop it, then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"cannot create run directory {run_dir}: {err.strerror}") from None


def run(args) -> int:
    from slope.train import distributed

    try:
        cfg, run_dir, resume = _resolve(args)
        if args.print_config:
            print(runconfig.to_toml(cfg), end="")
            return 0
        dist = distributed.init(cfg)  # under torchrun: join the other ranks (a no-op in one process)
    except ConfigError as err:
        raise UserError(str(err)) from None
    try:
        return _run(args, cfg, run_dir, resume, dist)
    except BaseException as err:
        if dist.world > 1 and not isinstance(err, UserError | SystemExit):
            # torchrun reports a failed worker by its exit code; this line says which rank and why
            print(f"slope train: rank {dist.rank} of {dist.world} failed: {type(err).__name__}: "
                  f"{' '.join(str(err).split())[:500]}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.close()


def _run(args, cfg: runconfig.RunConfig, run_dir: Path, resume: bool, dist) -> int:
    from slope.io.format import CHECKPOINTS_DIR, RUN_CONFIG_FILE, FormatError
    from slope.train.data_error import DataError
    from slope.train.models import ModelError
    from slope.train.preflight import preflight
    from slope.train.resume import check_resume
    from slope.train.stopping import Interrupted, TrainingFailed
    from slope.train.trainer import Trainer

    # Each rank named a new run directory from its own clock: rank 0's name is the run's.
    run_dir = dist.broadcast(run_dir)
    if dist.main:
        toml_text = runconfig.to_toml(cfg)
        print(f"# resolved config ({'resuming ' if resume else ''}run directory {run_dir})\n{toml_text}", flush=True)
    try:
        preflight(cfg)  # every check that needs no data, on every rank, before anything is written
        if resume:  # the config, global batch and tokenizer as the latest checkpoint trained with them
            check_resume(run_dir, cfg, dist)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    if dist.main and not resume:
        _make_run_dir(run_dir)
    dist.barrier()
    try:
        # rank 0 holds the lock for the whole job; the other ranks write nothing outside their shards
        with run_lock(run_dir) if dist.main else contextlib.nullcontext():
            if dist.main and (not resume or args.extra):
                # Written under the lock, once checked: on resume it records the allowed overrides for the
                # next resume (a plain resume leaves the file, and its comments, as they are).
                runconfig.save(cfg, run_dir / RUN_CONFIG_FILE)
            # A bar only on a terminal: redirected to a file (a cluster job's log) its \r updates would
            # be all there is between evaluations, so the log gets one plain line per logged step instead.
            terminal = sys.stdout.isatty() and sys.stderr.isatty()
            result = Trainer(cfg, run_dir, resume=resume, progress=terminal and not args.no_progress and dist.main,
                             dist=dist).run()
    except BaseException as err:
        # A new run that ends before its first checkpoint holds nothing of value, and its directory left
        # behind would make the same --run-dir be refused.
        if dist.main and not resume and not (run_dir / CHECKPOINTS_DIR).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(err, (ConfigError, DataError, ModelError, FormatError, FileNotFoundError)):
            raise UserError(str(err)) from None
        if isinstance(err, TrainingFailed):
            print(f"slope train: error: {err}", file=sys.stderr, flush=True)
            return 3
        if isinstance(err, Interrupted):
            if dist.main:
                print(f"slope train: {err}", flush=True)
            return err.exit_code
        raise
    if dist.main:
        print(format_summary(result.summary))
    return 0


def format_summary(summary: dict) -> str:
    lines = [
        f"\nrun: {summary['run_dir']}  ({summary['method']}, {summary['steps']} steps, "
        f"{summary['tokens']:,} tokens, {summary['tokens_per_s']:,.0f} tokens/s, wall {summary['wall_seconds']:.0f} s)",
        f"{'held-out set':<24} {'loss':>8} {'perplexity':>11} {'bits/byte':>10} {'tokens':>9}",
    ]
    for name, r in summary["eval"].items():
        label = "validation" if name == "val" else name
        lines.append(f"{label:<24} {r['loss']:>8.4f} {r['ppl']:>11.2f} {r['bpb']:>10.4f} {r['tokens']:>9,}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
