"""`slope train`: pretrain a model from a TOML run file plus --section.key=value overrides."""

from __future__ import annotations

import logging
import shutil
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
"""


def register(subparsers, name: str, help_text: str) -> None:
    import argparse

    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE_OR_NAME",
                   help="TOML run file, or a shipped config: default, tiny, gpu-gpt2-small")
    p.add_argument("--method", choices=None, help="dense or slope (same as --method.name)")
    p.add_argument("--run-dir", type=Path, help="run directory (must not exist); default runs/<name>-<method>-<time>")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, accepts_extra=True)


def _new_run_dir(cfg: runconfig.RunConfig, explicit: Path | None) -> Path:
    if explicit is not None:
        if explicit.exists():
            raise UserError(f"run directory {explicit} already exists; continue it with --resume {explicit} "
                            "or choose another --run-dir")
        return explicit
    base = Path(cfg.run.out_dir) / f"{cfg.run.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _resolve(args) -> tuple[runconfig.RunConfig, Path, bool]:
    if args.resume is not None:
        if args.config or args.method or args.run_dir or args.extra:
            raise UserError("--resume continues a run with its saved config; give no --config, --method, "
                            "--run-dir or overrides with it")
        config_file = args.resume / "config.toml"
        if not config_file.is_file():
            raise UserError(f"{args.resume} is not a run directory (no config.toml)")
        return runconfig.resolve(str(config_file)), args.resume, True
    extra = list(args.extra)
    if args.method:
        extra.append(f"--method.name={args.method}")
    cfg = runconfig.resolve(args.config, extra)
    return cfg, _new_run_dir(cfg, args.run_dir), False


def run(args) -> int:
    from slope.io.format import FormatError
    from slope.train.data import DataError
    from slope.train.models import ModelError
    from slope.train.trainer import Interrupted, Trainer, TrainingFailed

    run_dir, created = None, False
    try:
        cfg, run_dir, resume = _resolve(args)
        toml_text = runconfig.to_toml(cfg)
        print(f"# resolved config ({'resuming ' if resume else ''}run directory {run_dir})\n{toml_text}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=resume)
        created = not resume
        if created:
            runconfig.save(cfg, run_dir / "config.toml")
        result = Trainer(cfg, run_dir, resume=resume, progress=not args.no_progress).run()
    except (ConfigError, DataError, ModelError, FormatError, FileNotFoundError) as err:
        # Set-up errors come before any training: a run directory made just now holds nothing of value.
        if created and not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir)
        raise UserError(str(err)) from None
    except TrainingFailed as err:
        print(f"slope train: error: {err}", flush=True)
        return 3
    except Interrupted as err:
        print(f"slope train: {err}", flush=True)
        return 130
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
