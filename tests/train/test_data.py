"""The data pipeline on small files: sources, the tail split, token files, the sampler, embedded corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slope import cli
from slope.train import corpus, data
from slope.train.data import DataError, TokenFile, WindowSampler
from slope.train.prepare import prepare_data

TEXT = "".join(f"Line {i}: shall I compare thee to a summer's day?\n" for i in range(400))


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_bpe(iter([TEXT]), vocab_size=300)


def test_sources_text_folder_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / ".hidden.txt").write_text("never\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    folder = data.resolve_source(str(tmp_path))
    assert folder.kind == "folder"
    assert [t for _, t in folder.documents()] == ["alpha\n", "gamma", "delta", "beta\n"]
    assert [h["file"].rsplit("/", 1)[-1] for h in folder.hashes()] == ["a.txt", "c.jsonl", "b.md"]
    assert data.resolve_source(str(tmp_path / "c.jsonl")).kind == "jsonl"


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        data.resolve_source(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        data.resolve_source(str(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        list(data.resolve_source(str(bad)).documents())
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        list(data.resolve_source(str(binary)).documents())


def test_big_text_files_are_streamed_in_line_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 100)
    path = tmp_path / "big.txt"
    path.write_text(TEXT)
    pieces = [t for _, t in data.resolve_source(str(path)).documents()]
    assert len(pieces) > 10 and "".join(pieces) == TEXT
    assert all(p.endswith("\n") for p in pieces)


def test_tail_split_is_deterministic_disjoint_and_complete(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    source = data.resolve_source(str(path))
    head, tail = data.split_tail(source.documents, 0.1)
    head_text = "".join(t for _, t in head())
    tail_text = "".join(t for _, t in tail())
    assert head_text + tail_text == TEXT
    assert head_text.endswith("\n")
    assert abs(len(tail_text) / len(TEXT) - 0.1) < 0.01
    assert "".join(t for _, t in data.split_tail(source.documents, 0.1)[1]()) == tail_text


def test_write_tokens_and_metadata(tmp_path, tokenizer):
    docs = [("d1", "hello world\n"), ("d2", "shall I compare\n")]
    tokens = data.write_tokens(tmp_path / "x", iter(docs), tokenizer, description={"source": "test"})
    ids = [[*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for _, t in docs]
    assert tokens.tokens.tolist() == ids[0] + ids[1]
    meta = json.loads((tmp_path / "x.json").read_text())
    assert meta["n_tokens"] == len(ids[0]) + len(ids[1]) and meta["n_bytes"] == 28 and meta["n_documents"] == 2
    assert meta["dtype"] == "uint16" and meta["source"] == "test"
    assert isinstance(TokenFile(tmp_path / "x").tokens, np.memmap)
    with pytest.raises(DataError, match="is empty"):
        data.write_tokens(tmp_path / "y", iter([("e", "")]), tokenizer, description={"source": "e.txt"})


def test_sampler_windows_and_state(tmp_path, tokenizer):
    tokens = data.write_tokens(tmp_path / "s", iter([("d", TEXT)]), tokenizer, description={})
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
    source = data.resolve_source(str(tmp_path / "ds"))
    assert source.kind == "hf_dataset"
    assert [t for _, t in source.documents()] == ["one\n", "two\n"]


def test_val_auto_is_the_tail_for_a_user_corpus(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    _, train, val = prepare_data(tmp_path / "run", str(tmp_path / "c.txt"), "auto", 0.1, "", 300)
    assert val.meta["split"] == "last 0.1 of the text" and val.meta["source"] == str(tmp_path / "c.txt")
    assert 0.05 < val.meta["n_bytes"] / (train.meta["n_bytes"] + val.meta["n_bytes"]) < 0.15
    assert corpus.HELDOUT_OF["shakespeare"] == "shakespeare-heldout"
