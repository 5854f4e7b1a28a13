"""Token files: `NAME.bin` (raw uint16/uint32 ids, documents separated by the EOS token) plus `NAME.json`.

The JSON sidecar holds the tokenizer's identity, the counts and the source hashes. A token file is
written under a temporary name and renamed when complete, and read back with `np.memmap`, so a
corpus of any size costs no RAM to train on.
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slope.io.format import loads_json
from slope.train.data_error import DataError
from slope.train.tokenizing import encode_batch

TOKENS_FORMAT = 1
TOKEN_DTYPES = ("uint16", "uint32")  # the ids' type: uint16 while the vocabulary fits, else uint32


class TokenFile:
    """A memory-mapped token file `stem.bin` with its metadata sidecar `stem.json`."""

    def __init__(self, stem: Path) -> None:
        self.stem = Path(stem)
        meta_path = self.stem.with_suffix(".json")
        if not meta_path.is_file():
            raise DataError(f"token file metadata {meta_path} is missing")
        try:  # not UTF-8, nested too deep, NaN: a ValueError too (slope.io.format.loads_json)
            self.meta = loads_json(meta_path.read_bytes())
            n, dtype = _layout(self.meta)
        except ValueError as err:  # a cut-short write, or not a token file's metadata
            raise DataError(f"token file metadata {meta_path} is damaged ({type(err).__name__}: {err})") from None
        bin_path = self.stem.with_suffix(".bin")
        if not bin_path.is_file():
            raise DataError(f"token file {bin_path} is missing (its metadata {meta_path} is there)")
        size = bin_path.stat().st_size
        if size != n * dtype.itemsize:
            raise DataError(f"token file {bin_path} has {size} bytes but {meta_path} says {n} tokens "
                            f"({n * dtype.itemsize} bytes): the file is truncated or altered")
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_byte(self) -> float:
        return self.meta["n_tokens"] / max(1, self.meta["n_bytes"])


def _layout(meta) -> tuple[int, np.dtype]:
    """(n_tokens, dtype) of token file metadata, after checking every field a reader uses (ValueError)."""
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    if type(meta.get("format")) is not int or meta["format"] != TOKENS_FORMAT:  # not true, nor 1.0
        raise ValueError(f"format {reprlib.repr(meta.get('format'))}, but this slope reads token files of format "
                         f"{TOKENS_FORMAT}")
    for key in ("n_tokens", "n_bytes", "n_documents"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise ValueError(f"{key} must be an integer >= 0, got {reprlib.repr(value)}")
    if meta.get("dtype") not in TOKEN_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TOKEN_DTYPES)}, got {reprlib.repr(meta.get('dtype'))}")
    return meta["n_tokens"], np.dtype(meta["dtype"])


def write_tokens(
    stem: Path, documents: Iterator[tuple[str, str]], tokenizer, *, description: dict, batch: int = 64
) -> TokenFile:
    """Tokenize streamed documents into `stem.bin` (+ `stem.json`), written under a temporary name."""
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = tokenizer.eos_token_id
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".bin.tmp")
    n_tokens = n_bytes = n_docs = 0
    with open(tmp, "wb") as out:
        pending: list[str] = []

        def flush() -> None:
            nonlocal n_tokens
            for ids in encode_batch(tokenizer, pending):
                if eos is not None:
                    ids = [*ids, eos]
                arr = np.asarray(ids, dtype=dtype)
                out.write(arr.tobytes())
                n_tokens += len(arr)
            pending.clear()

        for _, text in documents:
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
            pending.append(text)
            if len(pending) >= batch:
                flush()
        flush()
    if n_bytes == 0:
        tmp.unlink()
        corpus, split = f"corpus {description.get('source', stem.name)!r}", description.get("split", "all")
        # a split's part: "the last 0.001 of the text of corpus 'x.txt'", not the corpus, is what is empty
        raise DataError(f"{corpus if split == 'all' else f'the {split} of {corpus}'} is empty: it holds no text")
    meta = {
        "format": TOKENS_FORMAT, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_bytes": n_bytes,
        "n_documents": n_docs, "eos_id": eos, "vocab_size": vocab, **description,
    }
    os.replace(tmp, stem.with_suffix(".bin"))
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return TokenFile(stem)


def tokenizer_description(tokenizer, name: str) -> dict:
    """How a token file's tokenizer is identified: its name and a hash of its vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"tokenizer": {"name": name, "vocab_size": len(tokenizer), "vocab_sha256": digest}}


def vocab_digest(tokenizer) -> str:
    """The SHA-256 of a tokenizer's vocabulary, as token files record it (`tokenizer_description`)."""
    return tokenizer_description(tokenizer, "")["tokenizer"]["vocab_sha256"]
