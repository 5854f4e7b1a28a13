"""The data pipeline on small files: sources, the tail split, token files, the sampler, embedded corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slope import cli
from slope.train import corpus, file_readers
from slope.train.data_error import DataError
from slope.train.prepare import prepare_data, split_tail
from slope.train.sources import resolve_source
from slope.train.token_files import TokenFile, write_tokens
from slope.train.tokenizing import train_bpe
from slope.train.window_sampler import WindowSampler

TEXT = "".join(f"Line {i}: shall I compare thee to a summer's day?\n" for i in range(400))


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(iter([TEXT]), vocab_size=300)


def test_sources_text_folder_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / ".hidden.txt").write_text("never\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    folder = resolve_source(str(tmp_path))
    assert folder.kind == "folder"
    assert [t for _, t in folder.documents()] == ["alpha\n", "gamma", "delta", "beta\n"]
    assert [h["file"].rsplit("/", 1)[-1] for h in folder.hashes()] == ["a.txt", "c.jsonl", "b.md"]
    assert resolve_source(str(tmp_path / "c.jsonl")).kind == "jsonl"


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_source(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        resolve_source(str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        list(resolve_source(str(bad)).documents())
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        list(resolve_source(str(binary)).documents())


def test_big_text_files_are_streamed_in_line_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(file_readers, "CHUNK_BYTES", 100)
    path = tmp_path / "big.txt"
    path.write_text(TEXT)
    pieces = [t for _, t in resolve_source(str(path)).documents()]
    assert len(pieces) > 10 and "".join(pieces) == TEXT
    assert all(p.endswith("\n") for p in pieces)


def test_text_without_line_ends_is_streamed_in_bounded_pieces_cut_after_spaces(tmp_path, monkeypatch):
    monkeypatch.setattr(file_readers, "CHUNK_BYTES", 100)
    text = TEXT.replace("\n", " ") + "x" * 350 + " end"  # one line: words, then a 350-character word
    path = tmp_path / "one-line.txt"
    path.write_text(text)
    pieces = [t for _, t in resolve_source(str(path)).documents()]
    assert "".join(pieces) == text  # nothing lost, nothing added
    assert max(len(p) for p in pieces) <= 2 * 100  # at most two reads of 100 characters in one piece
    words = [p for p in pieces if "x" * 50 not in p][:-1]
    assert len(words) > 10 and all(p.endswith(" ") for p in words)  # cut after a space while there is one


def test_peak_memory_of_reading_a_long_line_stays_bounded(tmp_path):
    """64 MB of text without a line end, read through the real reader in a fresh process: its peak
    resident memory grows by a few MB (1 MB pieces), not by the file's size."""
    import subprocess
    import sys

    path = tmp_path / "no-newline.txt"
    with open(path, "w") as f:
        for _ in range(64):
            f.write("lorem ipsum dolor sit amet " * 38_837)  # ~1 MB per write, no line end anywhere
    # The peak is the kernel's high-water mark of resident memory (VmHWM), reset first (clear_refs 5):
    # getrusage's maxrss would start at the forking parent's (this test process's) size.
    code = (
        "import re, sys\n"
        "from slope.train.sources import resolve_source\n"
        "def kib(key): return int(re.search(key + r':\\s+(\\d+) kB', open('/proc/self/status').read())[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kib('VmRSS')\n"
        "n = sum(len(t) for _, t in resolve_source(sys.argv[1]).documents())\n"
        "print(n, kib('VmHWM') - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    chars, grew_kib = map(int, out.split())
    assert chars == path.stat().st_size
    assert grew_kib < 32 * 1024, f"peak RSS grew by {grew_kib} KiB reading a {chars:,}-character line"


@pytest.mark.parametrize("make", ["nul", "device"])
def test_a_binary_file_or_a_device_is_refused_in_one_line(tmp_path, make):
    if make == "nul":
        path = tmp_path / "sparse.txt"
        with open(path, "wb") as f:
            f.truncate(8 << 20)  # 8 MB of NUL bytes, as a sparse file reads
        with pytest.raises(DataError, match="holds NUL characters: it is not a text file"):
            list(resolve_source(str(path)).documents())
    else:
        with pytest.raises(DataError, match="'/dev/zero' is not a regular file or folder"):
            resolve_source("/dev/zero")


def test_tail_split_is_deterministic_disjoint_and_complete(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    source = resolve_source(str(path))
    head, tail = split_tail(source.documents, 0.1)
    head_text = "".join(t for _, t in head())
    tail_text = "".join(t for _, t in tail())
    assert head_text + tail_text == TEXT
    assert head_text.endswith("\n")
    assert abs(len(tail_text) / len(TEXT) - 0.1) < 0.01
    assert "".join(t for _, t in split_tail(source.documents, 0.1)[1]()) == tail_text


def test_write_tokens_and_metadata(tmp_path, tokenizer):
    docs = [("d1", "hello world\n"), ("d2", "shall I compare\n")]
    tokens = write_tokens(tmp_path / "x", iter(docs), tokenizer, description={"source": "test"})
    ids = [[*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for _, t in docs]
    assert tokens.tokens.tolist() == ids[0] + ids[1]
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta["n_tokens"] == len(ids[0]) + len(ids[1]) and meta["n_bytes"] == 28 and meta["n_documents"] == 2
    assert meta["dtype"] == "uint16" and meta["source"] == "test"
    assert isinstance(TokenFile(tmp_path / "x").tokens, np.memmap)
    with pytest.raises(DataError, match="is empty"):
        write_tokens(tmp_path / "y", iter([("e", "")]), tokenizer, description={"source": "e.txt"})


def test_sampler_windows_and_state(tmp_path, tokenizer):
    tokens = write_tokens(tmp_path / "s", iter([("d", TEXT)]), tokenizer, description={})
    sampler = WindowSampler(tokens, seq_len=16, batch_size=3, seed=7)
    x, y = sampler.next()
    assert x.shape == y.shape == (3, 16)
    # each row is a window of 17 consecutive tokens of the file: inputs its first 16, targets its last 16
    windows = {tuple(int(t) for t in tokens.tokens[s : s + 17]) for s in range(len(tokens) - 16)}
    for xb, yb in zip(x.tolist(), y.tolist(), strict=True):
        assert (*xb, yb[-1]) in windows and xb[1:] == yb[:-1]
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(3)]
    again = WindowSampler(tokens, seq_len=16, batch_size=3, seed=0)
    again.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, [again.next() for _ in range(3)], strict=True):
        assert (ex == gx).all() and (ey == gy).all()
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(tokens, seq_len=len(tokens), batch_size=1, seed=0)


def test_embedded_corpora_hold_out_whole_works():
    train = {name for name, _ in corpus.embedded_documents("shakespeare")}
    held = {name.split(":", 1)[1] for name, _ in corpus.embedded_documents("shakespeare-heldout")}
    assert len(train) == 39 and held == set(corpus.HELDOUT_WORKS)
    assert not {n.split(":", 1)[1] for n in train} & held
    assert len(list(corpus.embedded_documents("milton"))) == 7


def test_the_small_corpora_are_parts_of_the_full_ones_and_hold_out_what_they_should():
    def works(name):
        return {doc.split(":", 1)[1]: text for doc, text in corpus.embedded_documents(name)}

    small, sonnets, milton_small = works("shakespeare-small"), works("sonnets"), works("milton-small")
    assert len(small) == 2 and small.items() <= works("shakespeare").items()  # training works, none held out
    assert list(sonnets) == ["sonnets_gut.txt"] and sonnets.items() <= works("shakespeare-heldout").items()
    assert corpus.HELDOUT_OF["shakespeare-small"] == "sonnets"
    assert len(milton_small) == 1 and milton_small.items() <= works("milton").items()
    assert 150_000 < sum(len(t) for t in small.values()) < 250_000  # seconds to train a tokenizer on


def test_prepare_command_and_training_on_its_output(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    out = tmp_path / "prep"
    assert cli.main(["prepare", str(tmp_path / "c.txt"), "-o", str(out), "--vocab-size", "300"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train_tokens"] > 10 * summary["val_tokens"] > 0
    meta = json.loads((out / "train.json").read_text())
    assert meta["source_files"][0]["sha256"] and meta["tokenizer"]["vocab_size"] == 300
    assert cli.main(["prepare", str(tmp_path / "c.txt"), "-o", str(out)]) == 2  # never overwritten
    tok, train, val = prepare_data(tmp_path / "run", str(out))
    assert len(tok) == 300 and len(train) == summary["train_tokens"] and len(val) == summary["val_tokens"]


def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one\n", "two\n"], "id": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    source = resolve_source(str(tmp_path / "ds"))
    assert source.kind == "hf_dataset"
    assert [t for _, t in source.documents()] == ["one\n", "two\n"]


def test_val_auto_is_the_tail_for_a_user_corpus(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    _, train, val = prepare_data(tmp_path / "run", str(tmp_path / "c.txt"), "auto", 0.1, "", 300)
    assert val.meta["split"] == "last 0.1 of the text" and val.meta["source"] == str(tmp_path / "c.txt")
    assert 0.05 < val.meta["n_bytes"] / (train.meta["n_bytes"] + val.meta["n_bytes"]) < 0.15
    assert corpus.HELDOUT_OF["shakespeare"] == "shakespeare-heldout"


# ---- tables, datasets and the text column ---------------------------------------------------------

ROWS = [f"row {i}: now is the winter of our discontent\n" for i in range(30)]


def _write_parquet(path, rows, column="text", **extra):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # small row groups, so the reader crosses record-batch boundaries
    pq.write_table(pa.table({column: rows, **extra}), str(path), row_group_size=7)


def _write_arrow(path, rows, column="text", stream=False):
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"id": list(range(len(rows))), column: rows})
    with pa.OSFile(str(path), "wb") as sink:
        opener = pa.ipc.new_stream if stream else pa.ipc.new_file
        with opener(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=4):
                writer.write_batch(batch)


def test_parquet_file_with_a_named_column(tmp_path):
    path = tmp_path / "corpus.parquet"
    _write_parquet(path, [*ROWS[:5], None, *ROWS[5:]], column="content", id=list(range(31)))
    source = resolve_source(str(path), text_column="content")
    assert source.kind == "parquet"
    docs = list(source.documents())
    assert [t for _, t in docs] == ROWS  # every row in order, the null cell left out
    assert docs[5][0] == f"{path}[6]"  # names count rows of the file, nulls included
    assert source.hashes()[0]["bytes"] == path.stat().st_size
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: content, id\); set data.text_column"):
        resolve_source(str(path))
    with pytest.raises(DataError, match=r"column 'id' of .* holds int64, not text"):
        resolve_source(str(path), text_column="id")


def test_arrow_files_in_both_layouts(tmp_path):
    for stream in (False, True):
        path = tmp_path / f"c{int(stream)}.arrow"
        _write_arrow(path, ROWS, stream=stream)
        source = resolve_source(str(path))
        assert source.kind == "arrow"
        assert [t for _, t in source.documents()] == ROWS
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="is not an Arrow file"):
        resolve_source(str(tmp_path / "junk.arrow"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="is not a parquet file"):
        resolve_source(str(tmp_path / "junk.parquet"))


def test_jsonl_with_a_configurable_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(ROWS[:3])))
    assert [t for _, t in resolve_source(str(path), text_column="body").documents()] == ROWS[:3]
    with pytest.raises(DataError, match=r"c.jsonl:1: expected an object with a string 'text' field \(this line has: body, n\)"):
        list(resolve_source(str(path)).documents())


def test_folder_of_shards_skips_the_readme(tmp_path):
    _write_parquet(tmp_path / "train-00000.parquet", ROWS[:10])
    _write_parquet(tmp_path / "train-00001.parquet", ROWS[10:20])
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ROWS[20:]))
    (tmp_path / "README.md").write_text("# a dataset card, not training text\n")
    source = resolve_source(str(tmp_path))
    assert source.kind == "folder"
    assert [p.name for p in source.files()] == ["extra.jsonl", "train-00000.parquet", "train-00001.parquet"]
    assert [t for _, t in source.documents()] == ROWS[20:] + ROWS[:20]
    # a missing column in a folder's table is found before anything is read, with the file named
    with pytest.raises(DataError, match=r"train-00000.parquet has no column 'body'"):
        resolve_source(str(tmp_path), text_column="body")


def test_a_parquet_file_is_no_longer_refused_as_binary_text(tmp_path):
    path = tmp_path / "corpus.parquet"
    _write_parquet(path, ROWS)
    _, train, val = prepare_data(tmp_path / "run", str(path), "", 0.2, "", 300)
    assert val.meta["split"] == "last 0.2 of the text" and train.meta["text_column"] == "text"
    assert train.meta["n_bytes"] + val.meta["n_bytes"] == sum(len(t) for t in ROWS)


def _dataset_dict(datasets, column="text"):
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({column: ROWS[:20] * 3, "id": list(range(60))}),
        "validation": datasets.Dataset.from_dict({column: ROWS[20:], "id": list(range(10))}),
    })


def test_dataset_dict_trains_on_train_and_validates_on_validation(tmp_path):
    datasets = pytest.importorskip("datasets")
    _dataset_dict(datasets, "story").save_to_disk(str(tmp_path / "dd"))
    spec = str(tmp_path / "dd")
    source = resolve_source(spec, text_column="story")
    assert (source.kind, source.split, source.splits) == ("hf_dataset", "train", ("train", "validation"))
    assert [t for _, t in source.documents()] == ROWS[:20] * 3
    assert all(p.parts[-2] == "train" for p in source.files())  # hashes only the split it reads
    for val in ("auto", ""):
        _, train, valid = prepare_data(tmp_path / f"run{val}", spec, val, 0.5, "", 300, text_column="story")
        assert valid.meta["source"] == f"{spec} (split validation)" and valid.meta["split"] == "all"
        assert valid.meta["n_bytes"] == sum(len(t) for t in ROWS[20:])
        assert train.meta["n_bytes"] == 3 * sum(len(t) for t in ROWS[:20])
    # named as data.val or as an evaluation set, a DatasetDict is read through its validation split
    (tmp_path / "c.txt").write_text(TEXT)
    tok, _, valid = prepare_data(tmp_path / "run-v", str(tmp_path / "c.txt"), spec, 0.5, "", 300, text_column="story")
    assert valid.meta["source"] == f"{spec} (split validation)"
    assert valid.meta["n_bytes"] == sum(len(t) for t in ROWS[20:])
    from slope.train.prepare import tokenize_source

    assert tokenize_source(tmp_path / "ev", "eval", spec, tok, text_column="story").meta["n_bytes"] == valid.meta["n_bytes"]
    with pytest.raises(DataError, match=r"dd has no column 'text' \(columns: story, id\)"):
        resolve_source(spec)
    # without a validation split the tail of `train` is held out, as for any other source
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ROWS})}).save_to_disk(str(tmp_path / "t"))
    _, _, valid = prepare_data(tmp_path / "run-t", str(tmp_path / "t"), "auto", 0.2, "", 300)
    assert valid.meta["split"] == "last 0.2 of the text"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ROWS})}).save_to_disk(str(tmp_path / "x"))
    with pytest.raises(DataError, match="has splits test, none named 'train'"):
        resolve_source(str(tmp_path / "x"))


def test_cached_hub_dataset_is_read_offline(tmp_path, monkeypatch):
    """A hub name resolves from the local `datasets` cache, laid out as a download leaves it, never the network.

    The cache is populated the way `load_dataset` does it, from local files by the packaged JSON builder,
    then moved to the directory names a hub download gets (`owner___name/default/0.0.0/<revision>`).
    """
    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "cache"
    files = {}
    for split, rows in (("train", ROWS[:20]), ("validation", ROWS[20:])):
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    Json(cache_dir=str(cache), dataset_name="tiny_text", config_name="default", data_files=files,
         hash="0123abcd").download_and_prepare()
    (cache / "someone___tiny_text").mkdir()
    (cache / "tiny_text").rename(cache / "someone___tiny_text" / "tmp")
    [config_dir] = (cache / "someone___tiny_text" / "tmp").iterdir()
    config_dir.rename(cache / "someone___tiny_text" / "default")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the network was asked")

    monkeypatch.setattr("socket.socket.connect", no_network)
    source = resolve_source("someone/tiny_text")
    assert (source.kind, source.split) == ("hub", "train")
    assert [t for _, t in source.documents()] == ROWS[:20]
    assert [t for _, t in source.validation().documents()] == ROWS[20:]
    assert source.files()[0].name == "tiny_text-train.arrow"
    with pytest.raises(DataError, match=r"'someone/other' not found: .* nor a `datasets` hub name in the local cache"):
        resolve_source("someone/other")
    with pytest.raises(DataError, match=r"no configuration 'nope' in the local cache \(cached: 'default'\)"):
        resolve_source("someone/tiny_text:nope")
    with pytest.raises(DataError, match=r"someone/tiny_text has no column 'body' \(columns: text\)"):
        resolve_source("someone/tiny_text", text_column="body")
    assert datasets  # imported for the builder above


def test_text_column_names_the_cached_eval_file(tmp_path, tokenizer):
    from slope.train.prepare import tokenize_source

    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"text": "a b c\n", "body": t}) + "\n" for t in ROWS[:5]))
    plain = tokenize_source(tmp_path / "out", "eval", str(path), tokenizer)
    body = tokenize_source(tmp_path / "out", "eval", str(path), tokenizer, text_column="body")
    assert plain.stem != body.stem and body.meta["n_bytes"] == sum(len(t) for t in ROWS[:5])
    # two eval sets with the same file name in different folders are two token files
    for folder, text in (("a", "short\n"), ("b", "a longer text than the other one\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.txt").write_text(text)
    a, b = (tokenize_source(tmp_path / "out", "eval", str(tmp_path / f / "notes.txt"), tokenizer) for f in "ab")
    assert (a.meta["n_bytes"], b.meta["n_bytes"]) == (6, 33)


def test_prepare_command_text_column(tmp_path, capsys):
    path = tmp_path / "c.parquet"
    _write_parquet(path, ROWS * 4, column="content")
    out = tmp_path / "prep"
    assert cli.main(["prepare", str(path), "-o", str(out), "--vocab-size", "300", "--text-column", "content"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_tokens"] > 0
    assert cli.main(["prepare", str(path), "-o", str(tmp_path / "p2"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no column 'text' (columns: content)" in err
    assert not (tmp_path / "p2").exists()
