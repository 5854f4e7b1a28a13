"""The `slope` dispatcher: one parser, one module per sub-command under `slope.cli.commands`.

Each sub-command module exposes `register(subparsers, name, help)`, which adds its parser and sets
`func` (called with the parsed namespace, returns an exit code). Command modules import nothing
heavy at module level (torch, transformers, numpy come inside their `run`), so `slope --help`
imports no torch and stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from slope import __version__
from slope.cli.errors import UserError, path_error, storage_error

# (command name, module under slope.cli.commands, one-line help)
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "train", "pretrain a language model with SLoPe (or dense) on a corpus"),
    ("prepare", "prepare", "tokenize text into a memory-mapped token file"),
    ("eval", "evaluate", "perplexity / bits-per-byte of a run or checkpoint on text"),
    ("info", "info", "versions, GPU and which sparse backends work here"),
    ("export", "export", "write a compressed SLoPe checkpoint or a dense Hugging Face model"),
    ("generate", "generate", "sample text from an exported model"),
    ("check", "check", "verify a run, checkpoint or export: checksums and mask invariants"),
    ("memory", "memory", "estimate training and inference memory on a GPU, dense and SLoPe side by side"),
]


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser, in which options may come before, between or after the positionals.

    Plain argparse fills a `nargs="*"` positional at its first run of positionals, so `slope eval RUN
    --json milton` left `milton` over as an unrecognized argument. A parser with positionals therefore
    parses intermixed (options first, then the positionals left over); one without (`slope train`)
    parses as before, so its `--section.key value` overrides stay in order in the extras.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or not self._get_positional_actions():
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args itself (Python < 3.12)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slope", description="Sparse pretraining of language models with SLoPe (N:M sparse + lazy adapters)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"slope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, module, help_text in COMMANDS:
        importlib.import_module(f"slope.cli.commands.{module}").register(sub, name, help_text)
    for command_parser in sub.choices.values():
        # -v also after the command (`slope eval RUN -v`); SUPPRESS: absent, it leaves the global flag alone
        command_parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                    help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"slope {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slope {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`slope memory | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush at exit onto the closed pipe
        return 0
    except Exception as err:
        storage = storage_error(err)
        if storage:  # a full disk or a read-only folder: the machine's state, not a mistake in the input
            print(f"slope {args.command}: error: {storage}", file=sys.stderr)
            return 3
        wrong_kind = path_error(err)
        if wrong_kind:
            print(f"slope {args.command}: error: {wrong_kind}", file=sys.stderr)
            return 2
        # Every mistake in the input is a UserError; anything else is slope's fault, so show where.
        traceback.print_exc()
        print(f"slope {args.command}: this is a bug in slope ({type(err).__name__}); please report it with the "
              "command line above", file=sys.stderr)
        return 1
