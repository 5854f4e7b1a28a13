"""What a corpus spec names, as a `Source` that streams its documents in a fixed order.

A source is an embedded corpus name, a text file, a folder of files, a JSONL, parquet or Arrow file
(text in the column `text_column`), a saved Hugging Face `datasets` folder (`save_to_disk`, also a
DatasetDict), a `datasets` hub name already in the local cache, or a `slope prepare` output folder.
Text is streamed document by document (`file_readers`, `hf_datasets`), so corpora larger than RAM
never load whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from slope.train import corpus, hf_datasets
from slope.train.data_error import DataError
from slope.train.file_readers import (
    RECORD_SUFFIXES,
    TABLE_SUFFIXES,
    TEXT_SUFFIXES,
    check_column,
    file_documents,
    table_schema,
)

VALIDATION_SPLIT = "validation"  # the split of a DatasetDict used as validation data when data.val is "auto"/""
HASH_BLOCK_BYTES = 1 << 20  # files are hashed a block at a time, never read whole


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
            yield from hf_datasets.dataset_documents(self._table(), self.text_column, self.label)
        else:
            for path in self.files():
                yield from file_documents(path, self.text_column)

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
                    check_column(table_schema(path), self.text_column, str(path))
        elif self.kind in ("hf_dataset", "hub"):
            table = self._table()
            check_column(table.features.arrow_schema, self.text_column, self.label)

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
                for block in iter(lambda f=f: f.read(HASH_BLOCK_BYTES), b""):
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
        dataset = hf_datasets.cached_hub_dataset(spec)
        if dataset is None:
            raise DataError(
                f"corpus {spec!r} not found: it is neither an existing path nor an embedded corpus "
                f"({', '.join(corpus.EMBEDDED)}), nor a `datasets` hub name in the local cache "
                f"({hf_datasets.hub_cache_dir()}); slope never downloads"
            )
        return _dataset_source(spec, "hub", None, text_column, dataset)
    if path.is_dir():
        return _folder_source(spec, path, text_column)
    if not path.is_file():  # a device (/dev/zero never ends), a FIFO, a socket: no corpus has an end there
        raise DataError(f"corpus {spec!r} is not a regular file or folder; give a file or folder of text")
    suffix = path.suffix.lower()
    kind = suffix[1:] if suffix in RECORD_SUFFIXES else "text"
    source = Source(spec, kind, path, text_column)
    source.check()
    return source


def _folder_source(spec: str, path: Path, text_column: str) -> Source:
    """A folder: a `slope prepare` output, a saved Hugging Face dataset, or a folder of text and tables."""
    if (path / "train.json").is_file() and (path / "tokenizer").is_dir():
        return Source(spec, "prepared", path)
    if any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return _dataset_source(spec, "hf_dataset", path, text_column, hf_datasets.load_saved_dataset(path))
    source = Source(spec, "folder", path, text_column)
    if not source.files():
        text = sorted(TEXT_SUFFIXES - {""})
        raise DataError(f"corpus folder {spec!r} holds no text files ({', '.join(text)}, .jsonl) nor tables "
                        f"({', '.join(sorted(TABLE_SUFFIXES))})")
    source.check()
    return source


def _dataset_source(spec: str, kind: str, path: Path | None, text_column: str, dataset) -> Source:
    """A source over an opened Dataset, or a DatasetDict read through its `train` split."""
    split, splits = hf_datasets.train_split(dataset, spec)
    source = Source(spec, kind, path, text_column, split, splits, dataset)
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
