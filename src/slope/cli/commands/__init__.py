"""Sub-commands of the `slope` CLI, one module each (listed in `slope.cli.main.COMMANDS`)."""
