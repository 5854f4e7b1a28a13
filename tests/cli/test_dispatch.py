"""The dispatcher and the package root: `slope --version`, `python -m slope`, the lazy public API."""

from __future__ import annotations

import subprocess
import sys

import pytest

import slope
from slope.cli import main


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"slope {slope.__version__}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: slope" in capsys.readouterr().out


def test_python_dash_m_slope_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "slope", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"slope {slope.__version__}"


def test_public_names_resolve_lazily_to_their_owners():
    # every name in __all__ resolves, from the module the package root says owns it
    for name in slope.__all__:
        value = getattr(slope, name)
        if name != "__version__":
            assert value.__module__.startswith("slope."), name
    assert set(slope.__all__) == {*slope._OWNERS, "__version__"}
    assert set(slope.__all__) <= set(dir(slope))


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'slope' has no attribute 'sparsfy'"):
        slope.sparsfy  # noqa: B018
