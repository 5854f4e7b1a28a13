"""The CLI's one error type, a mistake in the user's input, and the storage errors told apart from bugs."""

import errno
import os


class UserError(Exception):
    """Printed as one line `slope COMMAND: error: ...`, exit code 2, no traceback."""


# Failures of the storage, not of slope or of the input: no space, no quota, a read-only file system,
# no permission. The hint is for the first three (a write); a permission error names its path.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_WRITE_HINT = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
               errno.EROFS: "choose a writable folder"}


def storage_error(err: BaseException) -> str | None:
    """One line for an error the storage caused (exit code 3), else None.

    An OSError with one of STORAGE_ERRNOS; and safetensors' SafetensorError, which reports the same
    failures of its Rust writer only in its message ("No space left on device", "Read-only file system").
    """
    code = err.errno if isinstance(err, OSError) else None
    if type(err).__name__ == "SafetensorError":
        code = next((c for c in STORAGE_ERRNOS if os.strerror(c) in str(err)), None)
    if code not in STORAGE_ERRNOS:
        return None
    where = f": {err.filename}" if isinstance(err, OSError) and err.filename else ""
    hint = f"; {_WRITE_HINT[code]} and run it again" if code in _WRITE_HINT else ""
    return f"{os.strerror(code)}{where}{hint}"


def path_error(err: BaseException) -> str | None:
    """One line for a path of the wrong kind (a folder where a file belongs, or the reverse), else None:
    a run folder edited by hand, not a bug. Exit code 2, as for any mistake in the input."""
    if isinstance(err, IsADirectoryError | NotADirectoryError):
        expected = "a file" if isinstance(err, IsADirectoryError) else "a folder"
        return f"{err.filename}: {err.strerror}; {expected} belongs there: move it away and run it again"
    return None

