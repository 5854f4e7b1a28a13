"""Fuzz of the checkpoint and export readers: a mutated file gives a clean error, never anything else.

One small valid compressed export and one training checkpoint (written by `slope train`) are built once
per module. Each example copies one of them into a temporary folder, mutates one file (bit flips, a byte
replaced, truncation, appended garbage, deletion; and in separate tests, so that they are not drowned by
the byte-level ones, a JSON value replaced by a random JSON value or a JSON key removed) and calls the
readers. The only exceptions allowed are `slope.FormatError` and `FileNotFoundError`; a file the format
checksums (every file of an export, slope_model.json by its own checksum; every file of a checkpoint but
its manifest) that was changed must be refused, not loaded. The "resealed" tests write the checksums
again after the mutation (the checkpoint's manifest, the export's file list and metadata checksum), so
that the mutated file passes them and reaches the readers behind them. A third kind of mutation changes
the structure of a JSON file: a value replaced by JSON nested far too deep (the RecursionError of
`json.loads`), the file re-encoded (UTF-16, a byte-order mark, Latin-1, invalid UTF-8) or a value
replaced by one of another type. `slope check` is run on every mutated copy too, and must pass exactly
when the readers all do.

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
from _export_fixtures import reseal_export
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import slope
from slope import cli
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

# (which path, how many levels deep), then what to put there
structure_mutations = st.one_of(
    # a value replaced by a list or object nested that many levels (past MAX_JSON_DEPTH, or past json's
    # recursion limit), or by an integer of 5,000 digits (more than Python converts)
    st.tuples(st.just("nest"), st.tuples(st.integers(0, 1 << 30), st.integers(0, 4)),
              st.sampled_from([101, 5_000, 200_000]), st.sampled_from(["[", '{"a":', "digits"])),
    st.tuples(st.just("encode"), st.sampled_from(["utf-16", "utf-8-sig", "latin-1", "invalid-utf-8", "nul"])),
    # a value replaced by one of another type than the writer's
    st.tuples(st.just("json"), st.tuples(st.integers(0, 1 << 30), st.integers(0, 4)),
              st.sampled_from([None, True, "2", 2.5, -1, [], {}, [None], {"__tensor__": "0"}, {"__items__": 3},
                               {"__tuple__": None}, 1e308])),
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


def _restructure(data: bytes, kind: str, args: list) -> bytes:
    """The JSON text `data` nested too deep at a path, or re-encoded; `data` itself when it is not JSON."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    if kind == "encode":
        text = data.decode()
        return {"utf-16": lambda: text.encode("utf-16"), "utf-8-sig": lambda: text.encode("utf-8-sig"),
                "latin-1": lambda: text.replace('"', '"\u00e9', 1).encode("latin-1", errors="replace"),
                "invalid-utf-8": lambda: b"\xff" + data, "nul": lambda: data + b"\x00"}[args[0]]()
    (index, depth), levels, opening = args
    marker = "\u0001nest\u0001"
    text = json.dumps(_replace(doc, _json_path(doc, index, depth), marker), indent=1)
    closing = "]" if opening == "[" else "}"
    value = "9" * 5_000 if opening == "digits" else opening * levels + "1" + closing * levels
    return text.replace(json.dumps(marker), value).encode()


def mutate(file: Path, mutation: tuple) -> None:
    """Apply `mutation` to `file` (in a temporary copy)."""
    kind, *args = mutation
    data = bytearray(file.read_bytes())
    if kind == "delete":
        file.unlink()
        return
    if kind in ("nest", "encode"):
        file.write_bytes(_restructure(bytes(data), kind, args))
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
    if mutation[0] in ("json", "jsondel", "nest", "encode"):  # the JSON files only
        files = [f for f in files if f.endswith(".json")]
    rel = files[file_index % len(files)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / name
        shutil.copytree(base, copy)
        before = (copy / rel).read_bytes()
        mutate(copy / rel, mutation)
        changed = not (copy / rel).is_file() or (copy / rel).read_bytes() != before
        parts = rel.split("/")
        if reseal and name == "export":
            _reseal_export(copy)
        elif reseal and len(parts) > 2 and parts[2] != "manifest.json":  # a file of checkpoints/step_*/
            write_manifest(copy / parts[0] / parts[1])
        check(copy, rel, changed)


def _reseal_export(path: Path) -> None:
    """The export's checksums written again, where its metadata is still an object to write them into."""
    try:
        if isinstance(json.loads((path / "slope_model.json").read_bytes()), dict):
            reseal_export(path)
    except (ValueError, RecursionError, FileNotFoundError):  # not JSON any more, or deleted: nothing to reseal
        pass


def _checked(path: Path) -> bool:
    """Whether `slope check` passes the folder: it exits 0 (intact) or 1 (a finding), never anything else."""
    code = cli.main(["check", str(path)])
    assert code in (0, 1), f"slope check exited {code}"
    return code == 0


# ---- the readers ----------------------------------------------------------------------------------------


def check_export(path: Path, rel: str, changed: bool, resealed: bool = False) -> None:
    meta = _call(read_metadata, path)
    if meta is not None:
        _call(verify_files, path, meta)
    model = _call(slope.load, path, "cpu")
    if not (path / "slope_model.json").is_file():
        assert model is None  # no longer an export at all
        return
    assert _checked(path) == (model is not None), f"slope check and slope.load disagree on {rel}"
    if not changed:
        assert model is not None, f"an unchanged export failed to load ({rel})"
    elif not resealed:  # every file is checksummed: slope_model.json by itself, the others by it
        assert model is None, f"{rel} was changed but the export loaded"


def _dry_resume(state: dict) -> None:
    """What the trainer does with a trainer state that load_for_resume returned (slope.train.trainer._restore),
    without a model: it must not fail. The generators are put back as they were afterwards."""
    import torch

    from slope.train.resume import rng_state, set_rng_state

    saved = rng_state()
    try:
        set_rng_state(state["rng"])
        torch.Generator().set_state(state["sampler"]["generator"])
        assert isinstance(state["sampler"]["batches"], int)
        if state["scaler"]:
            torch.amp.GradScaler("cpu").load_state_dict(state["scaler"])
        assert isinstance(state.get("method", {}), dict) and isinstance(state["optimizer"]["param_groups"], list)
        int(state["step"]), int(state["tokens_seen"]), float(state["train_seconds"]), state.get("global_batch")
    finally:
        set_rng_state(saved)


def check_checkpoint(path: Path, rel: str, changed: bool, format2: bool) -> None:
    ckpt = _call(checkpoint.resolve_checkpoint, path)
    if ckpt is not None:
        _call(checkpoint.read_info, ckpt)
        _call(checkpoint.verify_checkpoint, ckpt)
        _call(checkpoint.load_trainer_state, ckpt)
    loaded = _call(checkpoint.load_checkpoint, path)
    resumed = _call(checkpoint.load_for_resume, path)
    if resumed is not None:
        _dry_resume(resumed[1])
    model = _call(slope.load, path, "cpu")
    if rel != "checkpoints/latest" and (path / "checkpoints").is_dir():  # `slope check` also judges the pointer
        assert _checked(path) == (loaded is not None and resumed is not None), f"slope check disagrees on {rel}"
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


@settings(FUZZ, max_examples=60)
@given(file_index=st.integers(0, 1 << 16), mutation=json_mutations | structure_mutations)
@example(file_index=1, mutation=("nest", (0, 1), 200_000, "["))  # slope_model.json: json.loads' RecursionError
def test_fuzz_resealed_export_json_values(bases, file_index, mutation):
    """Past the checksums (written again): the metadata's values, and the other JSON files, reach the readers."""
    _run(bases, "export", file_index, mutation, lambda p, r, c: check_export(p, r, c, resealed=True), reseal=True)


@settings(FUZZ, max_examples=40)
@given(file_index=st.integers(0, 1 << 16), mutation=structure_mutations)
@example(file_index=1, mutation=("encode", "utf-16"))
@example(file_index=0, mutation=("nest", (0, 1), 5_000, "["))  # config.json: not read by slope.load, but checksummed
def test_fuzz_export_json_structure(bases, file_index, mutation):
    _run(bases, "export", file_index, mutation, check_export)


@settings(FUZZ, max_examples=40)
@given(file_index=st.integers(0, 1 << 16), mutation=structure_mutations)
# resealed, so that each reaches its reader: slope.json, trainer_state.json and config.json nested past json's
# recursion limit (a RecursionError before), and the trainer state replaced by a list (an AttributeError in resume)
@example(file_index=2, mutation=("nest", (0, 0), 200_000, "["))
@example(file_index=5, mutation=("nest", (0, 1), 5_000, '{"a":'))
@example(file_index=0, mutation=("nest", (7, 1), 200_000, "["))
@example(file_index=2, mutation=("nest", (0, 1), 101, "digits"))
@example(file_index=5, mutation=("json", (0, 0), []))
@example(file_index=5, mutation=("json", (0, 1), None))
@example(file_index=5, mutation=("json", (3, 1), None))  # the sampler: a TypeError in the trainer, before
@example(file_index=5, mutation=("json", (4, 1), [None]))  # the generators' states: likewise
def test_fuzz_resealed_checkpoint_json_structure(bases, file_index, mutation):
    _run(bases, "format2", file_index, mutation, lambda p, r, c: check_checkpoint(p, r, c, format2=False), reseal=True)


def test_the_bases_load(bases):
    """The fuzz starts from files that load: an unchanged copy passes every reader."""
    for name in bases:
        files = _files(bases[name])
        assert files
    check_export(bases["export"], "slope_model.json", changed=False)
    check_checkpoint(bases["format2"], "checkpoints/latest", changed=False, format2=True)
