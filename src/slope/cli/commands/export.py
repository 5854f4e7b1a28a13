"""`slope export RUN_OR_CKPT --out DIR [--dense | --serve] [--dtype float16]`."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from slope.cli import UserError

log = logging.getLogger("slope")


def register(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("source", help="a training run or checkpoint directory (or an existing slope export)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    form = p.add_mutually_exclusive_group()
    form.add_argument(
        "--dense", action="store_true",
        help="write a plain Hugging Face model (sparse weights densified, adapters merged) instead",
    )
    form.add_argument(
        "--serve", action="store_true",
        help="write a serving export: a Hugging Face base that keeps its N:M zeros, and the adapters as a PEFT "
             "LoRA folder in DIR/adapter (vLLM --enable-lora, lm-eval peft=)",
    )
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="store floating tensors in this dtype (default: as trained)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slope.io.format import FormatError, one_line

    made_here = not Path(args.out).exists()
    try:
        out = _export_or_remove(args, made_here)
    except (FileNotFoundError, FileExistsError, FormatError) as err:
        raise UserError(str(err)) from err
    except ImportError as err:  # --serve without peft
        raise UserError(one_line(err)) from err
    except ValueError as err:  # --serve of a dense model
        raise UserError(str(err)) from err
    kind = ("serving export (base + PEFT adapter)" if args.serve
            else "dense Hugging Face model" if args.dense else "compressed SLoPe model")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("slope export: wrote a %s to %s (%.2f MB)", kind, out, size / 1e6)
    return 0


def _export_or_remove(args: argparse.Namespace, made_here: bool) -> Path:
    """The export; a folder this command created is removed when it fails (a full disk, a bad source): a
    half-written export would be refused as --out next time, and no reader could use it."""
    from slope.io.export import export
    from slope.io.format import DTYPES

    try:
        return export(args.source, args.out, dense=args.dense, serve=args.serve,
                      dtype=DTYPES[args.dtype] if args.dtype else None)
    except BaseException:
        if made_here:
            shutil.rmtree(args.out, ignore_errors=True)
        raise

