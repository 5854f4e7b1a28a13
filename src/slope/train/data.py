"""Text sources, tokenizers, memory-mapped token files and the random-window sampler.

A source is an embedded corpus name, a text file, a folder of files, a JSONL, parquet or Arrow file
(text in the column `text_column`), a saved Hugging Face `datasets` folder (`save_to_disk`, also a
DatasetDict), a `datasets` hub name already in the local cache, or a `slope prepare` output folder.
Text is streamed document by document (large text files in chunks of lines, tables in record
batches), so corpora larger than RAM never load whole.

A token file is `NAME.bin` (raw uint16/uint32 ids, documents separated by the EOS token) plus
`NAME.json` (tokenizer, counts, source hashes), read back with `np.memmap`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slope.train import corpus

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
TABLE_SUFFIXES = {".parquet", ".arrow"}  # read with pyarrow, one document per row
RECORD_SUFFIXES = {".jsonl", *TABLE_SUFFIXES}  # files whose documents sit in a named column or field
CHUNK_BYTES = 1 << 20  # a big text file is read and tokenized about 1 MB at a time
TABLE_BATCH_ROWS = 1024  # rows per record batch read from a parquet or Arrow file
VALIDATION_SPLIT = "validation"  # the split of a DatasetDict used as validation data when data.val is "auto"/""
TOKENS_FORMAT = 1
# owner/name or name, optionally :config, as the Hugging Face hub spells dataset ids
HUB_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")


class DataError(ValueError):
    """A corpus or tokenizer problem the user can fix (missing, empty, unreadable, wrong format)."""


# ---- sources --------------------------------------------------------------------------------------


@dataclass
class Source:
    """One text source; `documents()` streams (name, text) pieces in a fixed order.

    `text_column` names the column (parquet, Arrow, datasets) or field (JSONL) holding the text; plain
    text files and embedded corpora ignore it. `split` is the split of a DatasetDict or cached hub
    dataset this source reads.
    """

    spec: str
    kind: str  # embedded, text, folder, jsonl, parquet, arrow, hf_dataset, hub, prepared
    path: Path | None = None
    text_column: str = "text"
    split: str | None = None
    splits: tuple[str, ...] = ()  # every split of a DatasetDict / hub dataset
    dataset: object = field(default=None, repr=False, compare=False)  # the opened datasets object

    @property
    def label(self) -> str:
        """How metadata and messages name this source: the spec, plus the split when it is not `train`."""
        return f"{self.spec} (split {self.split})" if self.split not in (None, "train") else self.spec

    def files(self) -> list[Path]:
        if self.kind in ("text", "jsonl", "parquet", "arrow"):
            return [self.path]
        if self.kind == "folder":
            return _folder_files(self.path)
        if self.kind == "embedded":
            return [Path(str(corpus.embedded_archive(self.spec)))]
        if self.kind == "hf_dataset":
            root = self.path / self.split if self.split else self.path
            return sorted(p for p in root.rglob("*") if p.is_file())
        if self.kind == "hub":
            return sorted({Path(f["filename"]) for f in self._table().cache_files})
        return []

    def documents(self) -> Iterator[tuple[str, str]]:
        if self.kind == "embedded":
            yield from corpus.embedded_documents(self.spec)
        elif self.kind in ("hf_dataset", "hub"):
            yield from _dataset_documents(self._table(), self.text_column, self.label)
        else:
            for path in self.files():
                yield from _file_documents(path, self.text_column)

    def validation(self) -> Source | None:
        """The `validation` split of a DatasetDict or hub dataset as a source of its own, if it has one."""
        if VALIDATION_SPLIT not in self.splits or self.split == VALIDATION_SPLIT:
            return None
        other = Source(self.spec, self.kind, self.path, self.text_column, VALIDATION_SPLIT, self.splits,
                       self.dataset)
        other.check()
        return other

    def check(self) -> None:
        """Fail now, with one line, on a missing or non-text column, rather than after tokenizing for an hour."""
        if self.kind in ("parquet", "arrow", "folder"):  # a table's schema is read without its rows
            for path in self.files():
                if path.suffix.lower() in TABLE_SUFFIXES:
                    _check_column(_table_schema(path), self.text_column, str(path))
        elif self.kind in ("hf_dataset", "hub"):
            table = self._table()
            _check_column(table.features.arrow_schema, self.text_column, self.label)

    def _table(self):
        """The `datasets.Dataset` of this source's split (memory-mapped Arrow, opened once)."""
        ds = self.dataset
        if self.split is not None:
            ds = ds[self.split]
        return ds

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


def resolve_source(spec: str, *, text_column: str = "text") -> Source:
    """The Source named by `spec`; a DataError if it does not exist, holds no text or lacks `text_column`."""
    if corpus.is_embedded(spec):
        return Source(spec, "embedded", text_column=text_column)
    path = Path(spec).expanduser()
    if not path.exists():
        source = _cached_hub_source(spec, text_column)
        if source is None:
            raise DataError(
                f"corpus {spec!r} not found: it is neither an existing path nor an embedded corpus "
                f"({', '.join(corpus.EMBEDDED)}), nor a `datasets` hub name in the local cache ({_hub_cache()}); "
                "slope never downloads"
            )
        return source
    if path.is_dir():
        if (path / "train.json").is_file() and (path / "tokenizer").is_dir():
            return Source(spec, "prepared", path)
        if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return _saved_dataset_source(spec, path, text_column)
        source = Source(spec, "folder", path, text_column)
        if not source.files():
            text = sorted(TEXT_SUFFIXES - {""})
            raise DataError(f"corpus folder {spec!r} holds no text files ({', '.join(text)}, .jsonl) nor tables "
                            f"({', '.join(sorted(TABLE_SUFFIXES))})")
        source.check()
        return source
    suffix = path.suffix.lower()
    kind = suffix[1:] if suffix in RECORD_SUFFIXES else "text"
    source = Source(spec, kind, path, text_column)
    source.check()
    return source


def _folder_files(root: Path) -> list[Path]:
    """A folder's readable files in sorted order, hidden ones skipped.

    A folder holding parquet or Arrow files is a table dataset (a hub snapshot, a folder of shards):
    only its table and JSONL files are read, so the README.md beside the shards is not trained on.
    """
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and (p.suffix.lower() in TEXT_SUFFIXES or p.suffix.lower() in RECORD_SUFFIXES)
    )
    if any(p.suffix.lower() in TABLE_SUFFIXES for p in files):
        files = [p for p in files if p.suffix.lower() in RECORD_SUFFIXES]
    return files


def _file_documents(path: Path, text_column: str) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_column)
    if suffix in TABLE_SUFFIXES:
        return _table_documents(path, text_column)
    return _text_documents(path)


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
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); text files, .jsonl, "
                        ".parquet and .arrow are read") from None


def _jsonl_documents(path: Path, text_column: str = "text") -> Iterator[tuple[str, str]]:
    # A hand loop rather than datasets' JSON reader: it streams without an Arrow copy of the file and
    # names the line of a bad row.
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                has = f" (this line has: {', '.join(map(str, row))})" if isinstance(row, dict) else ""
                raise DataError(f"{path}:{lineno}: expected an object with a string {text_column!r} field{has}; "
                                "set data.text_column (slope prepare --text-column) to the field holding the text")
            yield f"{path}:{lineno}", row[text_column]


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # the submodule is what reads parquet
    except ImportError:
        raise DataError("reading parquet and Arrow files needs pyarrow: `pip install datasets` brings it") from None
    return pyarrow


def _open_arrow(path: Path):
    """A reader of an Arrow file in either layout: IPC file (Feather v2) or IPC stream (`datasets`' own)."""
    pa = _pyarrow()
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            return pa.ipc.open_stream(source)
        except pa.ArrowInvalid as err:
            raise DataError(f"{path} is not an Arrow file ({err})") from None


def _table_schema(path: Path):
    pa = _pyarrow()
    if path.suffix.lower() == ".parquet":
        try:
            return pa.parquet.ParquetFile(str(path)).schema_arrow
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path} is not a parquet file ({err})") from None
    return _open_arrow(path).schema


def _check_column(schema, column: str, where: str) -> None:
    pa = _pyarrow()
    if column not in schema.names:
        raise DataError(f"{where} has no column {column!r} (columns: {', '.join(schema.names)}); set "
                        "data.text_column (slope prepare --text-column) to the one holding the text")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataError(f"column {column!r} of {where} holds {kind}, not text; set data.text_column to a "
                        "column of strings")


def _table_documents(path: Path, column: str) -> Iterator[tuple[str, str]]:
    """The rows of one parquet or Arrow file, read one record batch at a time (only the text column)."""
    pa = _pyarrow()
    schema = _table_schema(path)
    _check_column(schema, column, str(path))
    if path.suffix.lower() == ".parquet":
        batches = pa.parquet.ParquetFile(str(path)).iter_batches(batch_size=TABLE_BATCH_ROWS, columns=[column])
    else:
        reader = _open_arrow(path)
        batches = ((reader.get_batch(i) for i in range(reader.num_record_batches))
                   if isinstance(reader, pa.ipc.RecordBatchFileReader) else reader)
    row = 0
    for batch in batches:
        for text in batch.column(batch.schema.get_field_index(column)).to_pylist():
            if text is not None:  # a null cell is a missing document, not an empty one
                yield f"{path}[{row}]", text
            row += 1


def _datasets(why: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{why} needs `pip install datasets`") from None
    return datasets


def _saved_dataset_source(spec: str, path: Path, text_column: str) -> Source:
    """A `save_to_disk` folder: a Dataset, or a DatasetDict read through its `train` split."""
    datasets = _datasets(f"{path} is a saved Hugging Face dataset; reading it")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable saved dataset ({type(err).__name__}: {err})") from None
    return _dataset_source(Source(spec, "hf_dataset", path, text_column, dataset=ds), datasets)


def _dataset_source(source: Source, datasets) -> Source:
    if isinstance(source.dataset, datasets.DatasetDict):
        source.splits = tuple(source.dataset)
        if "train" not in source.splits:
            raise DataError(f"dataset {source.spec} has splits {', '.join(source.splits)}, none named 'train'")
        source.split = "train"
    source.check()
    return source


def _hub_cache() -> str:
    """The `datasets` cache folder, found as `datasets` finds it, but read now: tests and users may set it late."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return str(Path(os.environ["HF_DATASETS_CACHE"]).expanduser())
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return str(Path(home).expanduser() / "datasets")


def _cached_hub_source(spec: str, text_column: str) -> Source | None:
    """A hub dataset name (`owner/name` or `owner/name:config`) read from the local `datasets` cache, or None.

    Read through `datasets`' own cache reader, the one `load_dataset` falls back to offline, so nothing
    here ever opens a network connection: a dataset that is not cached is simply not found.
    """
    if not HUB_NAME.match(spec):
        return None
    try:
        import datasets
        from datasets.packaged_modules.cache.cache import Cache
    except ImportError:
        return None
    name, _, config = spec.partition(":")
    try:
        builder = Cache(cache_dir=_hub_cache(), dataset_name=name.split("/")[-1], repo_id=name,
                        config_name=config or None, version="auto", hash="auto")
        ds = builder.as_dataset()
    except (ValueError, KeyError, OSError) as err:  # OSError covers FileNotFoundError
        # datasets says which configurations are cached in its message; pass that on in one line
        lines = str(err).splitlines() or [""]
        if "multiple" in lines[0] and ":" in lines[0]:  # several configs cached: the name alone is ambiguous
            configs = lines[0].split(":", 1)[1].strip()
            raise DataError(f"dataset {name!r} has several configurations in the local cache ({configs}); "
                            f"name one as {name}:CONFIG") from None
        cached = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Available configs")]
        if config and cached:
            raise DataError(f"dataset {name!r} has no configuration {config!r} in the local cache (cached: "
                            f"{cached[0].strip('[]')})") from None
        return None
    source = Source(spec, "hub", None, text_column, dataset=ds)
    return _dataset_source(source, datasets)


def _dataset_documents(ds, column: str, label: str) -> Iterator[tuple[str, str]]:
    """The rows of a `datasets.Dataset`, read lazily from its Arrow files in batches (only the text column)."""
    row = 0
    for batch in ds.select_columns([column]).iter(batch_size=TABLE_BATCH_ROWS):
        for text in batch[column]:
            if text is not None:
                yield f"{label}[{row}]", text
            row += 1


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

    In a run of `world` processes every rank draws the same global batch of `batch_size * world`
    window starts from the run seed and keeps its own slice (rank r: starts r*batch_size onwards), so
    the ranks' windows never overlap within a step and N ranks see exactly the windows one process
    with N times the batch sees. The generator state is the same on every rank, so a checkpoint holds
    one state for all of them.
    """

    def __init__(self, tokens: TokenFile, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"training text has {len(tokens)} tokens, fewer than one window of train.seq_len + 1 = "
                f"{seq_len + 1}; use more text or a shorter train.seq_len"
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world} processes")
        self.tokens = tokens.tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.seq_len  # exclusive: the last start leaves seq_len + 1 tokens
        starts = torch.randint(0, high, (self.batch_size * self.world,), generator=self.generator)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        windows = torch.from_numpy(windows)  # (batch, seq_len + 1)
        self.batches += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches = state["batches"]
