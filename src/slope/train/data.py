"""Text sources, tokenizers, memory-mapped token files and the random-window sampler.

A source is an embedded corpus name, a text file, a folder of text files, a JSONL file (`text`
field), a saved Hugging Face `datasets` folder, or a `slope prepare` output folder. Text is streamed
document by document (large files in chunks of lines), so corpora larger than RAM never load whole.

A token file is `NAME.bin` (raw uint16/uint32 ids, documents separated by the EOS token) plus
`NAME.json` (tokenizer, counts, source hashes), read back with `np.memmap`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slope.train import corpus

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
CHUNK_BYTES = 1 << 20  # a big text file is read and tokenized about 1 MB at a time
TOKENS_FORMAT = 1


class DataError(ValueError):
    """A corpus or tokenizer problem the user can fix (missing, empty, unreadable, wrong format)."""


# ---- sources --------------------------------------------------------------------------------------


@dataclass
class Source:
    """One text source; `documents()` streams (name, text) pieces in a fixed order."""

    spec: str
    kind: str  # embedded, text, folder, jsonl, hf_dataset, prepared
    path: Path | None = None

    def files(self) -> list[Path]:
        if self.kind in ("text", "jsonl"):
            return [self.path]
        if self.kind == "folder":
            return sorted(
                p for p in self.path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.path).parts)
                and (p.suffix.lower() in TEXT_SUFFIXES or p.suffix.lower() == ".jsonl")
            )
        if self.kind == "embedded":
            return [Path(str(corpus.embedded_archive(self.spec)))]
        if self.kind == "hf_dataset":
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return []

    def documents(self) -> Iterator[tuple[str, str]]:
        if self.kind == "embedded":
            yield from corpus.embedded_documents(self.spec)
        elif self.kind == "hf_dataset":
            yield from _hf_documents(self.path)
        else:
            for path in self.files():
                if path.suffix.lower() == ".jsonl":
                    yield from _jsonl_documents(path)
                else:
                    yield from _text_documents(path)

    def hashes(self) -> list[dict]:
        """sha256 and size of every underlying file: a prepared token file records where it came from."""
        out = []
        for path in self.files():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(CHUNK_BYTES), b""):
                    digest.update(block)
            name = f"{self.spec}:{path.name}" if self.kind == "embedded" else str(path)
            out.append({"file": name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
        return out


def resolve_source(spec: str) -> Source:
    """The Source named by `spec`; a DataError if it does not exist or holds no text files."""
    if corpus.is_embedded(spec):
        return Source(spec, "embedded")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"corpus {spec!r} not found: it is neither an existing path nor an embedded corpus "
            f"({', '.join(corpus.EMBEDDED)})"
        )
    if path.is_dir():
        if (path / "train.json").is_file() and (path / "tokenizer").is_dir():
            return Source(spec, "prepared", path)
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return Source(spec, "hf_dataset", path)
        source = Source(spec, "folder", path)
        if not source.files():
            raise DataError(f"corpus folder {spec!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))}, .jsonl)")
        return source
    return Source(spec, "jsonl" if path.suffix.lower() == ".jsonl" else "text", path)


def _text_documents(path: Path) -> Iterator[tuple[str, str]]:
    """A text file as pieces of about CHUNK_BYTES, cut at line ends."""
    try:
        with open(path, encoding="utf-8") as f:
            lines, size = [], 0
            for line in f:
                lines.append(line)
                size += len(line)
                if size >= CHUNK_BYTES:
                    yield str(path), "".join(lines)
                    lines, size = [], 0
            if lines:
                yield str(path), "".join(lines)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            yield f"{path}:{lineno}", row["text"]


def _hf_documents(path: Path) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face dataset; reading it needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"dataset {path} has splits {list(ds)}, none named 'train'")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise DataError(f"dataset {path} has no 'text' column (columns: {ds.column_names})")
    for i, row in enumerate(ds):  # rows are read lazily from the Arrow files
        yield f"{path}[{i}]", row["text"]


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


# ---- tokenizers -----------------------------------------------------------------------------------

EOS = "<|endoftext|>"


def train_bpe(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE trained on `texts`, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)


def pretrained_tokenizer(name: str):
    """Any AutoTokenizer path, or a name already in the local cache (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # transformers: many lines
        raise DataError(f"tokenizer {name!r} could not be loaded from a local path or the local cache: {reason}") from None


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens; the Rust batch encoder when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


# ---- token files ----------------------------------------------------------------------------------


class TokenFile:
    """A memory-mapped token file `stem.bin` with its metadata sidecar `stem.json`."""

    def __init__(self, stem: Path) -> None:
        self.stem = Path(stem)
        meta_path = self.stem.with_suffix(".json")
        if not meta_path.is_file():
            raise DataError(f"token file metadata {meta_path} is missing")
        try:
            self.meta = json.loads(meta_path.read_text())
            n, dtype = self.meta["n_tokens"], np.dtype(self.meta["dtype"])
        except (ValueError, KeyError, TypeError) as err:  # a cut-short write, or not a token file's metadata
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
        raise DataError(f"corpus {description.get('source', stem.name)!r} is empty: it holds no text")
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


# ---- sampling -------------------------------------------------------------------------------------


class WindowSampler:
    """Random windows of `seq_len + 1` tokens from a token file, with a checkpointable generator.

    Each batch is (inputs, targets), both (batch, seq_len) int64, targets shifted by one.
    """

    def __init__(self, tokens: TokenFile, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"training text has {len(tokens)} tokens, fewer than one window of train.seq_len + 1 = "
                f"{seq_len + 1}; use more text or a shorter train.seq_len"
            )
        self.tokens = tokens.tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.seq_len  # exclusive: the last start leaves seq_len + 1 tokens
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).tolist()
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        windows = torch.from_numpy(windows)  # (batch, seq_len + 1)
        self.batches += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches = state["batches"]
