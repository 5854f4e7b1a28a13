"""`slope eval` on the text inputs `slope train` reads: another JSONL field or table column
(`--text-column`), and a prepared token folder (its validation tokens, when the model's tokenizer made
them). Through the real command line, on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from _export_fixtures import make_tokenizer, tiny_model, write_training_checkpoint

from slope.cli import main
from slope.io.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_training_checkpoint(tmp_path_factory.mktemp("eval-inputs") / "run", tiny_model("llama"),
                                     make_tokenizer())


def scored(capsys, *args) -> dict:
    assert main(["eval", *map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)["results"]


def test_text_column_scores_another_field_as_the_default_scores_text(run, text_corpus, tmp_path, capsys):
    milton = (text_corpus(20_000, ood_chars=6_000) / "ood.txt").read_text()
    documents = [line for line in milton.splitlines() if line.strip()]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    (tmp_path / "body.jsonl").write_text("".join(json.dumps({"body": d, "text": "decoy"}) + "\n" for d in documents))
    by_default = scored(capsys, run, tmp_path / "text.jsonl")[str(tmp_path / "text.jsonl")]
    by_column = scored(capsys, run, tmp_path / "body.jsonl", "--text-column", "body")[str(tmp_path / "body.jsonl")]
    assert by_column == by_default and by_default["tokens"] > 100

    (tmp_path / "content.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in documents))
    assert main(["eval", str(run), str(tmp_path / "content.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "string 'text' field" in err[0] and "--text-column" in err[0], err


def test_a_prepared_folder_is_scored_on_its_validation_tokens(run, text_corpus, tmp_path, capsys):
    from slope.train.token_files import TokenFile

    corpus = text_corpus(20_000, ood_chars=6_000) / "train.txt"
    tokenizer_dir = latest_checkpoint(run) / "tokenizer"
    assert main(["prepare", str(corpus), "-o", str(tmp_path / "same"), "--tokenizer",
                 str(tokenizer_dir), "--val-fraction", "0.2"]) == 0
    capsys.readouterr()
    result = scored(capsys, run, tmp_path / "same")[str(tmp_path / "same")]
    val = TokenFile(tmp_path / "same" / "val")
    # every window of seq_len + 1 tokens predicts seq_len of them: all but the tail of the validation tokens
    assert 0 < len(val) - result["tokens"] <= 128 + 1

    assert main(["prepare", str(corpus), "-o", str(tmp_path / "other"), "--vocab-size", "300"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was prepared with another tokenizer" in err[0], err
