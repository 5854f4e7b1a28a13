"""Turning sources into token files: the tokenizer, the train/validation split, evaluation sets.

Layout of a prepared folder (written by `slope prepare`, and by `slope train` into RUN_DIR/data):

    tokenizer/            the tokenizer (save_pretrained)
    train.bin/.json       training tokens
    val.bin/.json         validation tokens (held-out tail of the text, or a separate source)
    eval-<name>.bin/.json evaluation sets, tokenized on demand

A prepared folder is itself a valid source: training on it reuses its tokenizer and tokens.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from slope.train import corpus
from slope.train.data_error import DataError
from slope.train.sources import Source, resolve_source
from slope.train.token_files import TokenFile, tokenizer_description, write_tokens
from slope.train.tokenizing import pretrained_tokenizer, train_bpe

log = logging.getLogger("slope")


def prepare_data(
    out_dir: Path, train: str, val: str = "", val_fraction: float = 0.05,
    tokenizer_name: str = "", vocab_size: int = 8192, *, text_column: str = "text",
) -> tuple[object, TokenFile, TokenFile]:
    """(tokenizer, train tokens, val tokens) in `out_dir`, tokenizing only what is not there yet.

    Validation data, in order: `val` when it names a source (a dataset's `validation` split if it has
    one); for `val` "auto" the held-out part of an
    embedded corpus; a DatasetDict's (or cached hub dataset's) `validation` split; else the last
    `val_fraction` of the training text. `text_column` is the column or JSON field holding the text.
    """
    out_dir = Path(out_dir)
    if val == "auto":
        val = corpus.HELDOUT_OF.get(train, "")
    source = resolve_source(train, text_column=text_column)
    if source.kind == "prepared":
        if tokenizer_name:
            log.warning("data.train %s is prepared with its own tokenizer; ignoring tokenizer.name", train)
        tokenizer = pretrained_tokenizer(str(source.path / "tokenizer"))
        train_tokens = TokenFile(source.path / "train")
        if val:
            val_tokens = tokenize_source(out_dir, "val", val, tokenizer, text_column=text_column)
        else:
            val_tokens = TokenFile(source.path / "val")
        return tokenizer, train_tokens, val_tokens

    val_src = _held_out(resolve_source(val, text_column=text_column)) if val else source.validation()
    if val_src is not None:
        train_docs, val_docs = source.documents, val_src.documents
        log.info("validation data: %s", val_src.label)
    else:
        train_docs, val_docs = split_tail(source.documents, val_fraction)

    tok_dir = out_dir / "tokenizer"
    if tok_dir.is_dir():
        tokenizer = pretrained_tokenizer(str(tok_dir))
    else:
        if tokenizer_name:
            tokenizer = pretrained_tokenizer(tokenizer_name)
        else:
            log.info("training a byte-level BPE tokenizer (vocab %d) on %s", vocab_size, source.label)
            tokenizer = train_bpe((text for _, text in train_docs()), vocab_size)
            if len(tokenizer) <= 257:
                raise DataError(f"corpus {train!r} is empty or too small to train a tokenizer on")
        tmp = out_dir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(str(tmp))
        tmp.replace(tok_dir)

    desc = tokenizer_description(tokenizer, tokenizer_name or "byte-level BPE trained on data.train")
    columns = {"text_column": text_column} if source.kind not in ("embedded", "text") else {}
    train_tokens = _tokenize(out_dir / "train", train_docs, tokenizer, {**desc, "source": source.label, **columns,
                             "split": "all" if val_src else f"first {1 - val_fraction:g} of the text",
                             "source_files": source.hashes()})
    val_from = val_src or source
    val_tokens = _tokenize(out_dir / "val", val_docs, tokenizer, {**desc, "source": val_from.label, **columns,
                           "split": "all" if val_src else f"last {val_fraction:g} of the text",
                           "source_files": val_from.hashes()})
    return tokenizer, train_tokens, val_tokens


def check_validation(tokens: TokenFile, seq_len: int) -> None:
    """DataError unless the validation tokens hold one window of train.seq_len + 1 tokens, which every
    evaluation of the run reads: a run calls it right after tokenizing, before the model is built."""
    if len(tokens) < seq_len + 1:
        split, source = tokens.meta.get("split", "all"), tokens.meta.get("source", tokens.stem)
        what = source if split == "all" else f"{split} of {source}"  # "last 0.05 of the text of train.txt"
        raise DataError(too_short_validation(what, f"has {len(tokens)} tokens", seq_len))


def too_short_validation(what: str, has: str, seq_len: int) -> str:
    """The line refusing a validation split (`what`: its source) shorter than one window (`has`: its size)."""
    return (f"the validation split ({what}) {has}, fewer than one window of train.seq_len + 1 = {seq_len + 1} "
            "tokens; give a larger data.val_fraction, a data.val source with more text, or a smaller train.seq_len")


def split_tail(
    documents: Callable[[], Iterator[tuple[str, str]]], fraction: float
) -> tuple[Callable[[], Iterator[tuple[str, str]]], Callable[[], Iterator[tuple[str, str]]]]:
    """Two document streams: the first (1 - fraction) of the text, and the rest, cut at a line end.

    Deterministic (the sources are read in a fixed order), and the split is on text, so not even the
    tokenizer sees the held-out part. Costs one extra reading pass to count the bytes.
    """
    total = sum(len(text.encode("utf-8")) for _, text in documents())
    cut = int(total * (1.0 - fraction))

    def part(want_head: bool) -> Iterator[tuple[str, str]]:
        seen = 0
        for name, text in documents():
            size = len(text.encode("utf-8"))
            if seen + size <= cut:
                head, tail = text, ""
            elif seen >= cut:
                head, tail = "", text
            else:  # the piece straddling the cut: split after the first line end past it
                at = len(text.encode("utf-8")[: cut - seen].decode("utf-8", errors="ignore"))
                newline = text.find("\n", at)
                at = len(text) if newline < 0 else newline + 1
                head, tail = text[:at], text[at:]
            seen += size
            chosen = head if want_head else tail
            if chosen:
                yield name, chosen

    return (lambda: part(True)), (lambda: part(False))


def _held_out(source: Source) -> Source:
    """A source named for validation or evaluation: a dataset's `validation` split when it has one."""
    return source.validation() or source


def _tokenize(stem: Path, documents, tokenizer, description: dict) -> TokenFile:
    if stem.with_suffix(".json").is_file():  # already prepared (a resumed run)
        try:
            return TokenFile(stem)
        except DataError as err:
            raise DataError(f"{err}; delete {stem.with_suffix('.bin')} and {stem.with_suffix('.json')} to "
                            f"tokenize {description['source']} again") from None
    log.info("tokenizing %s -> %s", description["source"], stem.with_suffix(".bin"))
    return write_tokens(stem, documents(), tokenizer, description=description)


def tokenize_source(out_dir: Path, prefix: str, spec: str, tokenizer, *, text_column: str = "text") -> TokenFile:
    """Token file of any source `spec` with `tokenizer`, cached in `out_dir` under a name from `spec`.

    A prepared token folder (`slope prepare`) gives its validation tokens as they are, when they were
    made with this same tokenizer (the vocabulary hash it recorded).
    """
    source = resolve_source(spec, text_column=text_column)
    if source.kind == "prepared":
        return _prepared_validation(source, tokenizer)
    source = _held_out(source)
    # No dots in the name: TokenFile adds .bin/.json with with_suffix, which would cut "notes.txt-1a2b3c4d"
    # back to "notes" and make every eval set named notes.* share one token file.
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(spec).name or spec)[:40]
    # Another column is another text; the default keeps the names that runs of earlier versions cached.
    key = spec if text_column == "text" else f"{spec}\0{text_column}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:8]
    desc = {**tokenizer_description(tokenizer, "run tokenizer"), "source": source.label,
            "split": "all", "source_files": source.hashes()}
    return _tokenize(Path(out_dir) / f"{prefix}-{slug}-{tag}", source.documents, tokenizer, desc)


def _prepared_validation(source: Source, tokenizer) -> TokenFile:
    """The validation tokens of a prepared folder, refused when another tokenizer made them."""
    tokens = TokenFile(source.path / "val")
    info = tokens.meta.get("tokenizer")
    recorded = info.get("vocab_sha256") if isinstance(info, dict) else None
    ours = tokenizer_description(tokenizer, "")["tokenizer"]["vocab_sha256"]
    if recorded != ours:
        raise DataError(f"{source.path} was prepared with another tokenizer (vocabulary sha256 "
                        f"{str(recorded)[:12]}, the model's is {ours[:12]}); evaluate on the text itself")
    return tokens

