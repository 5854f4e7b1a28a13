"""The `slope` command line: `main` dispatches to one module per sub-command under `slope.cli.commands`."""

from slope.cli.errors import UserError
from slope.cli.main import main

__all__ = ["UserError", "main"]
