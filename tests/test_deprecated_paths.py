"""Module paths that 0.1's docs named still import, warn once, and give the very same objects."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

MOVED = {
    "slope.hf_trainer": ("slope.train.hf_trainer", ["SlopeCallback"]),
    "slope.methods": ("slope.train.methods", ["METHODS", "Method", "SlopeMethod", "get_method"]),
    "slope.inference": ("slope.io.load", ["FormatError", "load", "load_tokenizer", "read_metadata", "verify_files"]),
    "slope.lmeval": ("slope.train.lmeval", ["LOCAL_TASK", "format_results", "run_lm_eval"]),
    "slope.kernels": ("slope.backends", ["backend_summary"]),
}


def fresh_import(name: str):
    sys.modules.pop(name, None)  # the warning is raised when the module body runs
    return importlib.import_module(name)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_warns_and_reexports(old):
    if old == "slope.lmeval":
        pytest.importorskip("lm_eval")
    new, names = MOVED[old]
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        module = fresh_import(old)
    target = importlib.import_module(new)
    for name in names:
        assert getattr(module, name) is getattr(target, name), name


def test_old_load_model_returns_model_and_tokenizer():
    import torch

    from slope.io.checkpoint import load_checkpoint

    with pytest.warns(DeprecationWarning, match="slope.checkpoint moved to slope.io.checkpoint"):
        old = fresh_import("slope.checkpoint")
    run = Path(__file__).parent / "io" / "fixtures" / "format1" / "run"
    model, tokenizer = old.load_model(run)
    expected_model, expected_tokenizer, _ = load_checkpoint(run)
    assert tokenizer.get_vocab() == expected_tokenizer.get_vocab()
    expected = expected_model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
