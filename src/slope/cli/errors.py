"""The CLI's one error type: a mistake in the user's input."""


class UserError(Exception):
    """Printed as one line `slope COMMAND: error: ...`, exit code 2, no traceback."""
