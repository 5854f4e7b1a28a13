"""The documents of one file: text in chunks cut at line ends, JSONL fields, parquet and Arrow columns.

Each reader streams (name, text) pieces, so a file larger than RAM never loads whole: a text file in
pieces of about CHUNK_BYTES, a table one record batch at a time (only its text column). Which reader a
file gets follows its suffix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from slope.train.data_error import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
TABLE_SUFFIXES = {".parquet", ".arrow"}  # read with pyarrow, one document per row
RECORD_SUFFIXES = {".jsonl", *TABLE_SUFFIXES}  # files whose documents sit in a named column or field
CHUNK_BYTES = 1 << 20  # a big text file is read and tokenized about 1 MB at a time
TABLE_BATCH_ROWS = 1024  # rows per record batch read from a parquet or Arrow file


def file_documents(path: Path, text_column: str) -> Iterator[tuple[str, str]]:
    """The documents of one file, read as its suffix says (`text_column`: the field or column of the text)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_column)
    if suffix in TABLE_SUFFIXES:
        return _table_documents(path, text_column)
    return _text_documents(path)


def _text_documents(path: Path) -> Iterator[tuple[str, str]]:
    """A text file as pieces of about CHUNK_BYTES, cut at line ends.

    A line longer than CHUNK_BYTES (text without line ends) is read CHUNK_BYTES characters at a time and
    cut after its last space, so memory stays bounded whatever the file holds. NUL characters, which no
    text has, stop the read: a binary or sparse file is refused instead of tokenized.
    """
    try:
        with open(path, encoding="utf-8") as f:
            pieces, size = [], 0
            for piece in _bounded_lines(f):
                if "\x00" in piece:
                    raise DataError(f"{path} holds NUL characters: it is not a text file (binary, or a sparse "
                                    "file); text files, .jsonl, .parquet and .arrow are read")
                pieces.append(piece)
                size += len(piece)
                if size >= CHUNK_BYTES:
                    yield str(path), "".join(pieces)
                    pieces, size = [], 0
            if pieces:
                yield str(path), "".join(pieces)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); text files, .jsonl, "
                        ".parquet and .arrow are read") from None


def _bounded_lines(f) -> Iterator[str]:
    """The lines of text file `f`; a line longer than CHUNK_BYTES characters comes in pieces of at most
    CHUNK_BYTES, each cut after its last space (a hard cut where it has none)."""
    carry = ""
    while True:
        read = f.readline(CHUNK_BYTES - len(carry))  # carry + read stays within CHUNK_BYTES
        if not read:
            if carry:
                yield carry
            return
        line, carry = carry + read, ""
        if len(line) >= CHUNK_BYTES and not line.endswith("\n"):
            cut = line.rfind(" ") + 1 or len(line)
            line, carry = line[:cut], line[cut:]
        yield line


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
                                "set data.text_column (--text-column of slope prepare and slope eval) to the field holding the text")
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


def table_schema(path: Path):
    """The Arrow schema of a parquet or Arrow file, read without its rows."""
    pa = _pyarrow()
    if path.suffix.lower() == ".parquet":
        try:
            return pa.parquet.ParquetFile(str(path)).schema_arrow
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path} is not a parquet file ({err})") from None
    return _open_arrow(path).schema


def check_column(schema, column: str, where: str) -> None:
    """A DataError unless `schema` has a column `column` of strings; `where` names the table in the message."""
    pa = _pyarrow()
    if column not in schema.names:
        raise DataError(f"{where} has no column {column!r} (columns: {', '.join(schema.names)}); set "
                        "data.text_column (--text-column of slope prepare and slope eval) to the one holding the text")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataError(f"column {column!r} of {where} holds {kind}, not text; set data.text_column to a "
                        "column of strings")


def _table_documents(path: Path, column: str) -> Iterator[tuple[str, str]]:
    """The rows of one parquet or Arrow file, read one record batch at a time (only the text column)."""
    pa = _pyarrow()
    schema = table_schema(path)
    check_column(schema, column, str(path))
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
