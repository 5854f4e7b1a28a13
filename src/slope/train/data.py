"""The data names the training loop and the command line import: `DataError`, `resolve_source`, `WindowSampler`.

Each is owned by the module of its job, and this one only gathers them:

    data_error.py      DataError, a data problem the user can fix
    sources.py         what a corpus spec names (Source, resolve_source)
    file_readers.py    the documents of one text, JSONL, parquet or Arrow file
    hf_datasets.py     saved Hugging Face datasets and cached hub datasets
    tokenizing.py      the run's tokenizer: trained BPE or local pretrained, batch encoding
    token_files.py     memory-mapped token files: writing and reading them
    window_sampler.py  random training windows, checkpointable
    prepare.py         sources into token files: tokenizer, train/validation split, evaluation sets
"""

from __future__ import annotations

from slope.train.data_error import DataError
from slope.train.sources import resolve_source
from slope.train.window_sampler import WindowSampler

__all__ = ["DataError", "WindowSampler", "resolve_source"]
