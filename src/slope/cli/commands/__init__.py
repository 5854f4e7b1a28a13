"""Sub-commands of the `slope` CLI, one module each (see slope.cli.COMMANDS)."""
