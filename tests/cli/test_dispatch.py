"""The dispatcher and the package root: `slope --version`, `python -m slope`, the lazy public API."""

from __future__ import annotations

import subprocess
import sys

import pytest

import slope
from slope.cli import main
from slope.cli.main import COMMANDS, build_parser


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


# ---- options anywhere on the line -------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "expected"), [
    # the reported line: a text after an option was left over as "unrecognized arguments: milton"
    (["eval", "RUN", "--json", "milton"], {"model": "RUN", "text": ["milton"], "json": True}),
    (["eval", "--max-tokens", "5", "RUN", "milton", "--json", "shakespeare"],
     {"model": "RUN", "text": ["milton", "shakespeare"], "max_tokens": 5}),
    (["eval", "RUN"], {"model": "RUN", "text": []}),
    (["prepare", "--vocab-size", "300", "corpus/", "-o", "OUT", "--text-column", "body"],
     {"source": "corpus/", "vocab_size": 300, "text_column": "body"}),
    (["export", "--out", "X", "--dense", "RUN"], {"source": "RUN", "out": "X", "dense": True}),
    (["generate", "--prompt", "Once", "MODEL", "--top-k", "3"], {"model": "MODEL", "prompt": "Once", "top_k": 3}),
    (["check", "-v", "RUN"], {"path": "RUN", "verbose": True}),
    (["info", "--json", "-v"], {"json": True, "verbose": True}),
    (["memory", "--mode", "prefill", "llama3-8b", "--world", "2"], {"model": "llama3-8b", "mode": "prefill", "world": 2}),
])
def test_options_before_between_and_after_positionals(argv, expected):
    args, extra = build_parser().parse_known_args(argv)
    assert extra == []
    assert {key: getattr(args, key) for key in expected} == expected


def test_every_command_is_covered_by_the_option_order_cases():
    covered = {"eval", "prepare", "export", "generate", "check", "info", "train", "memory"}
    assert {name for name, _, _ in COMMANDS} == covered


def test_train_overrides_keep_their_order_and_values():
    argv = ["train", "--optim.lr", "1e-3", "--config", "tiny", "--train.max_steps=5", "--eval.sets", "milton,x.txt", "-v"]
    args, extra = build_parser().parse_known_args(argv)
    assert args.config == "tiny" and args.verbose is True
    assert extra == ["--optim.lr", "1e-3", "--train.max_steps=5", "--eval.sets", "milton,x.txt"]


def test_verbose_before_the_command_is_kept():
    args, _ = build_parser().parse_known_args(["-v", "eval", "RUN"])
    assert args.verbose is True


def test_a_stray_argument_is_still_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["info", "--json", "stray"])
    assert stop.value.code == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_method_help_names_every_registered_method():
    # the help is written out (building the parser imports no torch); it must keep up with the registry
    from slope.train.methods import METHODS

    (train,) = [a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                if "--method" in a.option_strings]
    assert all(name in train.help for name in METHODS), train.help


def test_strip_adapters_is_public_and_leaves_the_sparse_base():
    import torch

    layer = slope.SlopeLinear(16, 8)
    layer.add_adapter(2)
    slope.strip_adapters(torch.nn.Sequential(layer))
    assert layer.rank == 0 and layer.adapter_a is None and layer.adapter_scale == 0.0
