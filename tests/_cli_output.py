"""What a refused command prints: exactly one line on stderr and no traceback (docs/reliability.md)."""

from __future__ import annotations


def one_error_line(capsys) -> str:
    """The single stderr line of the command just run (capsys: pytest's fixture)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
