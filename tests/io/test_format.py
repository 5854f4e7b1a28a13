"""The format rules (slope.io.format): declared once, dtype names, checksums, one-line errors."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import torch

import slope
from slope.io import format as fmt

IO_DIR = Path(fmt.__file__).parent


def test_format_error_is_the_public_one_and_a_value_error():
    assert slope.FormatError is fmt.FormatError
    assert issubclass(fmt.FormatError, ValueError)


def _string_constants(tree: ast.Module) -> set[str]:
    """Every string literal of a module except docstrings and dict keys (metadata field names, such
    as the export's "tokenizer" field, may equal a file name)."""
    skipped = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    skipped |= {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped}


def test_file_names_and_versions_are_declared_only_in_format():
    rules = {fmt.WEIGHTS_FILE, fmt.TOKENIZER_DIR, fmt.INFO_FILE, fmt.TRAINER_STATE_FILE, fmt.RUN_CONFIG_FILE,
             fmt.HF_CONFIG_FILE, fmt.CHECKPOINTS_DIR, fmt.LATEST_FILE, fmt.META_FILE, fmt.EXPORT_FORMAT_NAME,
             fmt.TRAINER_TENSORS_FILE, fmt.LEGACY_TRAINER_STATE_FILE, fmt.MANIFEST_FILE}
    for module in sorted(IO_DIR.glob("*.py")):
        if module.name == "format.py":
            continue
        tree = ast.parse(module.read_text())
        assert not _string_constants(tree) & rules, f"{module.name} spells out a file name of slope.io.format"
        assigned = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for target in node.targets if isinstance(target, ast.Name)}
        assert not assigned & {"FORMAT", "FORMAT_VERSION", "CHECKPOINT_FORMAT", "DTYPES"}, module.name


@pytest.mark.parametrize("name", list(fmt.DTYPES))
def test_dtype_names_round_trip(name):
    assert fmt.dtype_name(fmt.DTYPES[name]) == name


def test_dtype_name_refuses_what_the_format_cannot_record():
    with pytest.raises(ValueError, match="cannot be stored"):
        fmt.dtype_name(torch.int8)


def test_sha256_file(tmp_path):
    data = bytes(range(256)) * 5000  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert fmt.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_one_line_keeps_every_line_of_a_multi_line_error():
    err = RuntimeError("Error(s) in loading state_dict:\n\tMissing key(s): a.\n\n\tUnexpected key(s): b.")
    assert fmt.one_line(err) == "RuntimeError: Error(s) in loading state_dict: Missing key(s): a. Unexpected key(s): b."
