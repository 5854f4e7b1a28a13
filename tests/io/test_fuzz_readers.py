"""Fuzz of the checkpoint and export readers: a mutated file gives a clean error, never anything else.

One small valid compressed export and one training checkpoint (written by `slope train`) are built once
per module. Each example copies one of them into a temporary folder, mutates one file (bit flips, a byte
replaced, truncation, appended garbage, deletion; and in separate tests, so that they are not drowned by
the byte-level ones, a JSON value replaced by a random JSON value or a JSON key removed) and calls the
readers. The only exceptions allowed are `slope.FormatError` and `FileNotFoundError`; a file the format
checksums (the export's files listed in slope_model.json, a checkpoint's files listed in manifest.json)
that was changed must be refused, not loaded. The "resealed" tests write the checkpoint's manifest again
after the mutation, so that the mutated file passes the checksums and reaches the readers behind them.

Reproducible: derandomized, a bounded number of examples, no deadline. Integers in the random JSON
values are kept small: a model config that asks for billions of parameters is a memory problem, not a
parsing one, and is out of scope here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from _export_fixtures import reseal as write_manifest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import slope
from slope.io import checkpoint
from slope.io.format import FormatError
from slope.io.load import read_metadata, verify_files

CLEAN = (FormatError, FileNotFoundError)

FUZZ = settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: a failure shows its raw example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- the valid files, built once -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(text_corpus, tmp_path_factory) -> dict[str, Path]:
    from _export_fixtures import make_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("fuzz-bases")
    export = slope.save_compressed(tiny_model("gpt2", adapters=True), root / "export", make_tokenizer())

    from slope import cli

    text = text_corpus(20_000) / "train.txt"  # tests/conftest.py
    run = root / "run"
    assert cli.main(["train", "--config", "tiny", "--no-progress", "--run-dir", str(run), f"--data.train={text}",
                     "--data.val=", "--data.val_fraction=0.1", "--tokenizer.vocab_size=300", "--eval.every=0",
                     "--eval.sets=[]", "--checkpoint.every=2", "--train.max_steps=2"]) == 0
    format2 = root / "format2"
    shutil.copytree(run / "checkpoints", format2 / "checkpoints")  # the checkpoints only: small copies
    return {"export": export, "format2": format2}


def _files(base: Path) -> list[str]:
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


# ---- mutations ----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)

json_mutations = st.one_of(
    # (which path, how many levels deep)
    st.tuples(st.just("json"), st.tuples(st.integers(0, 1 << 30), st.integers(0, 4)), json_values),
    st.tuples(st.just("jsondel"), st.tuples(st.integers(0, 1 << 30), st.integers(1, 4))),
)

mutations = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 7)), min_size=1, max_size=4)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 30)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete")),
)


def _json_path(doc, index: int, depth: int) -> tuple:
    """A path of at most `depth` keys into `doc`, each key chosen among its level's by the digits of `index`:
    every top-level key is as likely as any other, however large the object under another one is."""
    path: tuple = ()
    while len(path) < depth and isinstance(doc, dict | list) and doc:
        keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
        key = keys[index % len(keys)]
        index //= len(keys)
        path, doc = (*path, key), doc[key]
    return path


def _replace(doc, path: tuple, new):
    if not path:
        return new
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return doc


def mutate(file: Path, mutation: tuple) -> None:
    """Apply `mutation` to `file` (in a temporary copy)."""
    kind, *args = mutation
    data = bytearray(file.read_bytes())
    if kind == "delete":
        file.unlink()
        return
    if kind == "flip":
        for pos, bit in args[0]:
            if data:
                data[pos % len(data)] ^= 1 << bit
    elif kind == "byte":
        if data:
            data[args[0] % len(data)] = args[1]
    elif kind == "truncate":
        data = data[: args[0] % (len(data) + 1)]
    elif kind == "append":
        data += args[0]
    elif kind in ("json", "jsondel"):
        try:
            doc = json.loads(bytes(data))
        except ValueError:  # not a JSON file: replace a byte instead
            if data:
                data[hash(args[0]) % len(data)] ^= 0xFF
        else:
            path = _json_path(doc, *args[0])
            if kind == "json":
                doc = _replace(doc, path, args[1])
            elif path:  # a key or an item removed
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                del parent[path[-1]]
            data = bytearray(json.dumps(doc, indent=1).encode())
    file.write_bytes(bytes(data))


def _call(reader, *args):
    """`reader(*args)`, or None when it raises a clean error; anything else propagates and fails the test."""
    try:
        return reader(*args)
    except CLEAN:
        return None


def _run(bases: dict, name: str, file_index: int, mutation: tuple, check, reseal: bool = False) -> None:
    base = bases[name]
    files = _files(base)
    if mutation[0] in ("json", "jsondel"):  # the JSON files only
        files = [f for f in files if f.endswith(".json")]
    rel = files[file_index % len(files)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / name
        shutil.copytree(base, copy)
        before = (copy / rel).read_bytes()
        mutate(copy / rel, mutation)
        changed = not (copy / rel).is_file() or (copy / rel).read_bytes() != before
        parts = rel.split("/")
        if reseal and len(parts) > 2 and parts[2] != "manifest.json":  # a file of checkpoints/step_*/
            write_manifest(copy / parts[0] / parts[1])
        check(copy, rel, changed)


# ---- the readers ----------------------------------------------------------------------------------------


def check_export(path: Path, rel: str, changed: bool) -> None:
    meta = _call(read_metadata, path)
    if meta is not None:
        _call(verify_files, path, meta)
    model = _call(slope.load, path, "cpu")
    listed = rel != "slope_model.json"  # every other file is listed with its size and SHA-256
    if not changed:
        assert model is not None, f"an unchanged export failed to load ({rel})"
    elif listed:
        assert model is None, f"{rel} was changed but the export loaded"


def check_checkpoint(path: Path, rel: str, changed: bool, format2: bool) -> None:
    ckpt = _call(checkpoint.resolve_checkpoint, path)
    if ckpt is not None:
        _call(checkpoint.read_info, ckpt)
        _call(checkpoint.verify_checkpoint, ckpt)
        _call(checkpoint.load_trainer_state, ckpt)
    loaded = _call(checkpoint.load_checkpoint, path)
    resumed = _call(checkpoint.load_for_resume, path)
    model = _call(slope.load, path, "cpu")
    if not changed:
        assert loaded is not None and resumed is not None and model is not None, f"unchanged {rel} failed"
    elif format2 and rel.startswith("checkpoints/step_") and not rel.endswith("/manifest.json"):
        # every file of a format-2 checkpoint but the manifest is checksummed by it
        assert loaded is None and resumed is None and model is None, f"{rel} was changed but the checkpoint loaded"


# ---- the fuzz -------------------------------------------------------------------------------------------

# Regression cases: examples the fuzz found (readers that let another exception escape), kept explicit.


@settings(FUZZ, max_examples=80)  # the export readers are fast
@given(file_index=st.integers(0, 1 << 16), mutation=mutations)
@example(file_index=1, mutation=("truncate", 0))  # slope_model.json emptied
def test_fuzz_export_readers(bases, file_index, mutation):
    _run(bases, "export", file_index, mutation, check_export)


@settings(FUZZ, max_examples=200)  # cheap: most examples are refused at slope_model.json
@given(file_index=st.integers(0, 1 << 16), mutation=json_mutations)
@example(file_index=0, mutation=("json", (0, 0), []))  # slope_model.json: a list, not an object
@example(file_index=0, mutation=("json", (2116, 99), ["", None]))  # model_config: a huggingface_hub validation error
def test_fuzz_export_json_values(bases, file_index, mutation):
    _run(bases, "export", file_index, mutation, check_export)


@FUZZ
@given(file_index=st.integers(0, 1 << 16), mutation=mutations)
def test_fuzz_format2_checkpoint_readers(bases, file_index, mutation):
    _run(bases, "format2", file_index, mutation, lambda p, r, c: check_checkpoint(p, r, c, format2=True))


@FUZZ
@given(file_index=st.integers(0, 1 << 16), mutation=mutations)
def test_fuzz_resealed_checkpoint_readers(bases, file_index, mutation):
    _run(bases, "format2", file_index, mutation, lambda p, r, c: check_checkpoint(p, r, c, format2=False), reseal=True)


@FUZZ
@given(file_index=st.integers(0, 1 << 16), mutation=json_mutations)
def test_fuzz_format2_checkpoint_json_values(bases, file_index, mutation):
    _run(bases, "format2", file_index, mutation, lambda p, r, c: check_checkpoint(p, r, c, format2=True))


@FUZZ
@given(file_index=st.integers(0, 1 << 16), mutation=json_mutations)
@example(file_index=0, mutation=("json", (12, 99), []))  # config.json: transformers raised TypeError
@example(file_index=428, mutation=("jsondel", (428, 1)))  # slope.json without slope_config: read_info's KeyError
def test_fuzz_resealed_checkpoint_json_values(bases, file_index, mutation):
    _run(bases, "format2", file_index, mutation, lambda p, r, c: check_checkpoint(p, r, c, format2=False), reseal=True)


def test_the_bases_load(bases):
    """The fuzz starts from files that load: an unchanged copy passes every reader."""
    for name in bases:
        files = _files(bases[name])
        assert files
    check_export(bases["export"], "slope_model.json", changed=False)
    check_checkpoint(bases["format2"], "checkpoints/latest", changed=False, format2=True)
