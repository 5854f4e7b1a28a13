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
import logging
import math
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from _cli_output import one_error_line
from _export_fixtures import reseal as write_manifest
from _export_fixtures import reseal_export
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import slope
from slope import cli
from slope.io import checkpoint
from slope.io.format import FormatError
from slope.io.load import read_metadata, verify_files
from slope.train import runconfig
from slope.train.data_error import DataError

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
    return {"export": export, "format2": format2, "run": run}


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


# ---- every JSON and TOML file slope reads: structure, encoding and type at every level (seeded) -------------
#
# Each file a user, a copy or a crash can leave in a bad state is mutated the ways a hand edit or a hostile
# file can: nested 100,000 levels deep (JSON arrays and objects; TOML arrays, inline tables, dotted keys and
# table headers), re-encoded (Latin-1, UTF-16 and UTF-8 with a byte-order mark, invalid UTF-8, NUL bytes), and
# a value at each level replaced by one of another type: a list, an object, a string, null, 10**400, NaN and
# Infinity (which JSON has not), 1e400 (beyond a float's range; Python's json reads all three), a boolean.
# Which paths, and which wrong value at each, are drawn by a seeded random.Random: reproducible, and a few per
# level, so the whole section stays within seconds. The readers answer with their clean error naming the file
# (FormatError, DataError, ConfigError; the CLI's one line and exit 2), or accept the file; what no reader can
# accept (the structure and encoding mutations, NaN and its kin, a wrong type for the whole document) must be
# refused. A checkpoint's files are resealed after the mutation (its manifest written again), so the readers
# behind the checksums are what answers.

SEED = 20261205
DEEP = 100_000
# raw JSON text put where a value was
WRONG_JSON = {"list": "[]", "object": "{}", "string": '"2"', "null": "null", "10**400": "1" + "0" * 400,
              "NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "1e400": "1e400", "true": "true",
              "false": "false"}
NOT_JSON = ("NaN", "Infinity", "-Infinity", "1e400")  # refused wherever they stand: not JSON numbers
DEEP_JSON = {"deep-array": "[" * DEEP + "]" * DEEP, "deep-object": '{"a": ' * DEEP + "1" + "}" * DEEP}
ENCODINGS = ("latin-1", "utf-16", "utf-8-bom", "invalid-utf-8", "nul")
MARKER = "\u0001wrong\u0001"


def _encode(text: str, how: str) -> bytes:
    """`text` (ASCII JSON or TOML holding a string) written as `how` says."""
    return {"latin-1": lambda: text.replace('"', '"\u00e9', 1).encode("latin-1"),
            "utf-16": lambda: text.encode("utf-16"), "utf-8-bom": lambda: text.encode("utf-8-sig"),
            "invalid-utf-8": lambda: text.encode().replace(b'"', b'"\xc3\x28', 1),
            "nul": lambda: text.encode().replace(b'"', b'"\x00', 1)}[how]()


def _levels(doc) -> dict[int, list[tuple]]:
    """Every path into `doc` (keys and indices), by its length."""
    found: dict[int, list[tuple]] = {}
    stack = [((), doc)]
    while stack:
        path, value = stack.pop()
        found.setdefault(len(path), []).append(path)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack += [((*path, key), child) for key, child in items]
    return found


def _json_cases(doc, rng: random.Random) -> list[tuple[str, tuple, str]]:
    """(label, path, raw JSON) of the mutations of one document: each wrong value once, where the value is of
    another type, at paths spread over the levels (one at each level first, the document itself among them),
    and both deep values at a random path."""
    levels = _levels(doc)
    depths = sorted(levels)
    cases = []
    for i, label in enumerate(rng.sample(sorted(WRONG_JSON), len(WRONG_JSON))):
        depth = depths[i] if i < len(depths) else rng.choice(depths)
        paths = [p for p in levels[depth] if _wrong_type(_value_at(doc, p), label)]
        paths = paths or [p for d in depths for p in levels[d] if _wrong_type(_value_at(doc, p), label)]
        cases.append((label, rng.choice(paths), WRONG_JSON[label]))
    cases += [(label, rng.choice(levels[rng.choice(depths)]), raw) for label, raw in DEEP_JSON.items()]
    return cases


def _value_at(doc, path: tuple):
    for key in path:
        doc = doc[key]
    return doc


def _wrong_type(value, label: str) -> bool:
    """Whether the wrong value `label` is of another JSON type than `value` (10**400: any integer too)."""
    same = {"list": list, "object": dict, "string": str, "null": type(None), "true": bool, "false": bool}
    if label == "10**400":
        return not isinstance(value, int) or isinstance(value, bool) or value < 10**400
    return label in NOT_JSON or type(value) is not same[label]


def _with(doc, path: tuple, raw: str) -> str:
    """The JSON text of `doc` with the value at `path` replaced by the raw JSON `raw`."""
    return json.dumps(_replace(json.loads(json.dumps(doc)), path, MARKER), indent=1).replace(json.dumps(MARKER), raw)


def _must_refuse(label: str, path: tuple) -> bool:
    return label in NOT_JSON or label in DEEP_JSON or label in ENCODINGS or not path


def _clean_error(call, where: Path) -> str | None:
    """None when `call()` returns; its message when it raises a clean error, which must be one line naming
    `where` (the mutated copy); anything else fails the test."""
    try:
        call()
    except (FormatError, DataError, FileNotFoundError) as err:
        message = str(err)
        assert "\n" not in message and str(where) in message, message
        return message
    return None


def _mutated_copies(base: Path, rel: str, seed: int, rounds: int = 1):
    """(label, path, copy) for each mutation of the JSON file `rel` of the folder `base`, each in a fresh copy:
    `rounds` draws of `_json_cases`, then each encoding."""
    rng = random.Random(seed)
    doc = json.loads((base / rel).read_text())
    text = json.dumps(doc, indent=1)
    cases = [(label, path, _with(doc, path, raw).encode())
             for _ in range(rounds) for label, path, raw in _json_cases(doc, rng)]
    cases += [(how, (), _encode(text, how)) for how in ENCODINGS]
    for label, path, data in cases:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / base.name
            shutil.copytree(base, copy)
            (copy / rel).write_bytes(data)
            yield label, path, copy


STEP2 = "checkpoints/step_00000002"
LAYER = "transformer.h.0.mlp.c_fc"
# (base, file): a checkpoint's info, trainer state and manifest; an export's metadata; a token file's metadata
JSON_FILES = [("format2", f"{STEP2}/slope.json"), ("format2", f"{STEP2}/trainer_state.json"),
              ("format2", f"{STEP2}/manifest.json"), ("export", "slope_model.json"), ("data", "train.json")]


def _read_mutated(base: str, rel: str, path: tuple, copy: Path) -> str | None:
    """The readers of the mutated JSON file `rel` of `copy` (a copy of the base `base`), past its checksums:
    their clean refusal, or None when they accept it."""
    if base == "format2":  # resume's reader verifies the manifest and reads the info and the trainer state
        if not rel.endswith("manifest.json"):
            write_manifest(copy / STEP2)  # past the checksums, to the readers
        refused = _clean_error(lambda: checkpoint.load_for_resume(copy), copy)
        return refused if refused is not None else _clean_error(lambda: checkpoint.load_checkpoint(copy), copy)
    if base == "export":  # its own checksum written again; its list of files as mutated
        try:
            if path[:1] != ("metadata_sha256",) and isinstance(json.loads((copy / rel).read_bytes()), dict):
                reseal_export(copy, relist=False)
        except (ValueError, RecursionError):  # not JSON any more: nothing to reseal
            pass
        return _clean_error(lambda: slope.load(copy, "cpu"), copy)
    from slope.train.token_files import TokenFile

    def read():
        tokens = TokenFile(copy / "train")
        assert len(tokens) >= 0 and math.isfinite(tokens.tokens_per_byte)  # every field a reader uses

    return _clean_error(read, copy)


def _base(bases: dict, base: str) -> Path:
    return bases["run"] / "data" if base == "data" else bases[base]


@pytest.mark.parametrize("base,rel", JSON_FILES, ids=[rel.rsplit("/", 1)[-1] for _, rel in JSON_FILES])
def test_json_file_every_level(bases, base, rel):
    """Each mutation of each file: its readers' clean refusal naming it, or a file they read whole."""
    rounds = 4 if base == "data" else 2
    for label, path, copy in _mutated_copies(_base(bases, base), rel, seed=SEED + len(rel), rounds=rounds):
        refused = _read_mutated(base, rel, path, copy)
        assert refused or not _must_refuse(label, path), f"{rel} with {label} at {path} was accepted"


HUGE = "1" + "0" * 400
# What this fuzz found, kept explicit: (base, file, path, raw JSON, what it was). Each is refused now, in one
# line naming the file, but the first: slope.json's slope_config {} is the default config, which loads.
REGRESSIONS = [
    ("format2", f"{STEP2}/slope.json", ("slope_config",), "{}", "KeyError 'n' in the mask check of a resume"),
    ("format2", f"{STEP2}/slope.json", ("slope_config", "adapter_scale"), HUGE, "OverflowError loading the model"),
    ("format2", f"{STEP2}/slope.json", ("slope_config", "adapter_scale"), "1e400", "an infinite scale, accepted"),
    ("format2", f"{STEP2}/trainer_state.json", ("train_seconds",), HUGE, "OverflowError in the resume check"),
    ("format2", f"{STEP2}/trainer_state.json", ("tokens_seen",), HUGE, "accepted: OverflowError in summary.json"),
    ("export", "slope_model.json", ("layers", LAYER, "adapter_scale"), HUGE, "OverflowError loading the model"),
    ("export", "slope_model.json", ("layers", LAYER, "source"), "[]", "a line that named no file"),
    ("export", "slope_model.json", ("layers", LAYER, "adapter_scale"), "NaN", "a NaN scale, accepted"),
    ("export", "slope_model.json", ("layers", LAYER, "adapter_scale"), "-1.0", "a negative scale, accepted"),
    ("data", "train.json", (), DEEP_JSON["deep-array"], "RecursionError reading a run's token files"),
    ("data", "train.json", ("n_tokens",), "13193.0", "TypeError mapping the token file"),
    ("data", "train.json", ("n_bytes",), "null", "accepted: TypeError in bits per byte, after training"),
    ("data", "train.json", ("dtype",), '"float16"', "accepted: token ids read as floats"),
]


@pytest.mark.parametrize("base,rel,path,raw,was", REGRESSIONS, ids=[f"{r[1].rsplit('/', 1)[-1]}:{'.'.join(map(str, r[2]))}="
                                                                   f"{r[3][:8]}" for r in REGRESSIONS])
def test_json_regressions(bases, tmp_path, base, rel, path, raw, was):
    source = _base(bases, base)
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    (copy / rel).write_text(_with(json.loads((source / rel).read_text()), path, raw))
    refused = _read_mutated(base, rel, path, copy)  # a clean answer, whichever it is
    assert bool(refused) == (raw != "{}"), f"{refused} ({was}, before)"


def test_metrics_lines_every_level(bases, tmp_path, caplog):
    """metrics.jsonl with mutated lines among good ones: each is left out with a warning, or kept as a record
    whose kind, step and loss are what the readers use; a resume then rewrites the file, and the curves plot."""
    from slope.train.logs import MetricsLog, read_metrics
    from slope.train.plots import plot_curves

    good = (bases["run"] / "metrics.jsonl").read_text().splitlines()
    rng = random.Random(SEED)
    lines = []
    for line in good:
        record = json.loads(line)
        cases = [_with(record, path, raw) for _ in range(4) for _, path, raw in _json_cases(record, rng)]
        lines += [line, *(" ".join(case.split("\n")) for case in cases), line[: len(line) // 2]]  # and one cut short
    data = "\n".join(lines).encode() + b"\n" + b"\n".join(_encode(good[0], how) for how in ENCODINGS)
    (tmp_path / "metrics.jsonl").write_bytes(data + b"\n")
    with caplog.at_level(logging.WARNING, logger="slope"):
        records = read_metrics(tmp_path)
    assert "unreadable line(s)" in caplog.text
    assert all(isinstance(r["kind"], str) and type(r["step"]) is int and r["step"] >= 0 for r in records)
    assert all(isinstance(r["loss"], int | float) and not isinstance(r["loss"], bool)
               for r in records if r["kind"] == "train")
    assert [json.dumps(r) for r in records if json.dumps(r) in good] and len(records) < len(lines)
    MetricsLog(tmp_path, 1, logger="none").close()  # a resume from step 1 rewrites what it keeps
    plot_curves(read_metrics(tmp_path), tmp_path / "curves.png", None, title="fuzz")


# ---- the run config (config.toml): `slope train --config FILE` and `slope train --resume RUN` ----------------

# TOML text put where a value was, by the type it is wrong for; TOML has no null
WRONG_TOML = {"list": "[1]", "table": "{ a = 1 }", "string": '"2"', "10**400": "1" + "0" * 400, "nan": "nan",
              "inf": "inf", "-inf": "-inf", "1e400": "1e400", "true": "true",
              "5000-digits": "1" * 5000}  # more digits than Python converts: tomllib's ValueError
DEEP_TOML = {"deep-array": "[" * DEEP + "]" * DEEP, "deep-inline-table": "{ a = " * DEEP + "1" + " }" * DEEP,
             "deep-inline-dotted-key": "{ " + ".".join(["a"] * DEEP) + " = 1 }",
             # 200 inline tables, each under a key of 99 parts: parsed, but 20,000 levels deep (repr's RecursionError)
             "deep-inline-dotted-nest": ("{ " + ".".join(["a"] * 99) + " = ") * 200 + "1" + " }" * 200}
BACKSTOP = "/nonexistent/fuzz-train.txt"  # a run config the mutation leaves valid fails preflight on it, untrained


def _toml(data: dict, where: tuple = (), raw: str = "", extra: str = "") -> str:
    """The run config `data` ({section: {key: value}}) as TOML, with the value at `where` (a section, a key or
    a list item) replaced by the raw TOML `raw`, and `extra` lines at the end of the first section."""
    def value(v, path):
        if path == where:
            return raw
        if isinstance(v, list):
            return "[" + ", ".join(value(x, (*path, i)) for i, x in enumerate(v)) + "]"
        return json.dumps(v) if isinstance(v, str) else runconfig._toml_value(v)

    top = [f"{name} = {raw}" for name in data if (name,) == where]
    tables = [f"[{name}]\n" + "".join(f"{k} = {value(v, (name, k))}\n" for k, v in values.items())
              + (extra if i == 0 else "") for i, (name, values) in enumerate(data.items()) if (name,) != where]
    return "\n".join(top + tables)


def _toml_cases(data: dict, rng: random.Random) -> list[tuple[str, str]]:
    """(label, TOML text) of the mutations of the run config `data`; each is one no run config can be."""
    cases = [(how, _encode(_toml(data), how)) for how in ENCODINGS]
    sections = sorted(data)
    keys = sorted((s, k) for s in sections for k in data[s] if k != "name" or s != "method")
    for label, raw in DEEP_TOML.items():
        cases.append((label, _toml(data, rng.choice(keys), raw).encode()))
    cases.append(("deep-dotted-key", _toml(data, extra=".".join(["a"] * DEEP) + " = 1\n").encode()))
    cases.append(("deep-table-header", (_toml(data) + "\n[" + ".".join(["run"] * DEEP) + "]\n").encode()))
    for label in ("list", "string", "10**400", "true", "inf"):  # a section that is no table
        cases.append((f"section={label}", _toml(data, (rng.choice(sections),), WRONG_TOML[label]).encode()))
    for label, raw in WRONG_TOML.items():  # a key's value of another type than its own, for a key of each type
        for kind in (bool, int, float, str, list):
            key = rng.choice([k for k in keys if type(data[k[0]][k[1]]) is kind])
            if _wrong_for(data[key[0]][key[1]], label):
                cases.append((f"{key[0]}.{key[1]}={label}", _toml(data, key, raw).encode()))
    lists = [(s, k) for s, k in keys if isinstance(data[s][k], list) and data[s][k]]
    for label in ("list", "table", "10**400", "true", "nan"):  # an item of a list of strings
        section, key = rng.choice(lists)
        cases.append((f"{section}.{key}[0]={label}", _toml(data, (section, key, 0), WRONG_TOML[label]).encode()))
    return cases


def _wrong_for(value, label: str) -> bool:
    """Whether the TOML value `label` stands for is wrong where `value` is: of another type, or a number no
    key takes (an integer beyond 64 bits; a float key refuses NaN and the infinities)."""
    return not (isinstance(value, bool) and label == "true") and not (isinstance(value, str) and label == "string")


@pytest.fixture(scope="module")
def run_config(bases) -> dict:
    """The run config `bases` trained with, as data, with the training text one that does not exist."""
    data = runconfig.read_toml(bases["run"] / "config.toml")
    data["data"]["train"] = BACKSTOP
    return data


def _refused_in_one_line(argv: list[str], capsys) -> str:
    code = cli.main(argv)
    line = one_error_line(capsys)
    assert code == 2, line
    return line


def test_run_config_every_level(bases, run_config, tmp_path, capsys):
    """`slope train --config FILE` and `--resume RUN` (RUN/config.toml) with each mutation: one line, exit 2,
    naming the file or the key, never the training text the backstop names (nothing reached preflight)."""
    run = tmp_path / "run"
    shutil.copytree(bases["run"], run)
    listing = sorted(p.relative_to(run) for p in run.rglob("*"))
    clean = _toml(run_config)
    assert runconfig.resolve(_write(tmp_path / "base.toml", clean.encode()), []).data.train == BACKSTOP
    for label, data in _toml_cases(run_config, random.Random(SEED)):
        file = _write(tmp_path / "config.toml", data)
        line = _refused_in_one_line(["train", "--config", file, "--run-dir", str(tmp_path / "r")], capsys)
        assert BACKSTOP not in line and ("config.toml" in line or "config key" in line or "config section" in line
                                         or "[slope]" in line), (label, line)
        assert not (tmp_path / "r").exists()
        (run / "config.toml").write_bytes(data)
        resumed = _refused_in_one_line(["train", "--resume", str(run)], capsys)
        assert resumed == line.replace(str(file), str(run / "config.toml")), (label, line, resumed)
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == listing  # nothing written


@pytest.mark.parametrize("value", ["[" * DEEP + "]" * DEEP, "{ a = " * DEEP + "1" + " }" * DEEP, "1" * 5000,
                                   "1" + "0" * 400, "1\n" + ".".join(["a"] * DEEP) + " = 1"],
                         ids=["deep-array", "deep-inline-table", "5000-digits", "10**400", "newline-dotted-key"])
@pytest.mark.parametrize("key", ["train.max_steps", "optim.lr", "method.srste_decay"])
def test_run_config_override_nested_or_huge(key, value, tmp_path, capsys):
    """An override's value goes through the same TOML reader: a RecursionError or ValueError traceback before."""
    method = ["--method", "srste"] if key.startswith("method.") else []
    line = _refused_in_one_line(["train", "--config", "tiny", "--run-dir", str(tmp_path / "r"), *method,
                                 f"--{key}={value}"], capsys)
    assert f"config key '{key}' expects" in line and len(line) < 200, line


def _write(file: Path, data: bytes) -> str:
    file.write_bytes(data)
    return str(file)
