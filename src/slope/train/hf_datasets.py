"""Hugging Face `datasets` as text: saved `save_to_disk` folders and hub datasets in the local cache.

Nothing here opens a network connection: a hub name is read through `datasets`' own cache reader, the
one `load_dataset` falls back to offline, so a dataset that is not cached is simply not found. Rows
are read lazily from the dataset's Arrow files, in batches, only the text column.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from slope.train.data_error import DataError
from slope.train.file_readers import TABLE_BATCH_ROWS

# owner/name or name, optionally :config, as the Hugging Face hub spells dataset ids
HUB_NAME = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")


def _datasets(why: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{why} needs `pip install datasets`") from None
    return datasets


def load_saved_dataset(path: Path):
    """The Dataset or DatasetDict of a `save_to_disk` folder."""
    datasets = _datasets(f"{path} is a saved Hugging Face dataset; reading it")
    try:
        return datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable saved dataset ({type(err).__name__}: {err})") from None


def train_split(dataset, spec: str) -> tuple[str | None, tuple[str, ...]]:
    """(the split read for training, every split): ("train", its splits) for a DatasetDict, (None, ()) else."""
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return None, ()
    splits = tuple(dataset)
    if "train" not in splits:
        raise DataError(f"dataset {spec} has splits {', '.join(splits)}, none named 'train'")
    return "train", splits


def hub_cache_dir() -> str:
    """The `datasets` cache folder, found as `datasets` finds it, but read now: tests and users may set it late."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return str(Path(os.environ["HF_DATASETS_CACHE"]).expanduser())
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return str(Path(home).expanduser() / "datasets")


def cached_hub_dataset(spec: str):
    """The dataset of a hub name (`owner/name` or `owner/name:config`) from the local cache, or None.

    None when `spec` is not a hub name, `datasets` is not installed, or the dataset is not cached; a
    DataError when the cache holds it but the name does not say which configuration.
    """
    if not HUB_NAME.match(spec):
        return None
    try:
        from datasets.packaged_modules.cache.cache import Cache
    except ImportError:
        return None
    name, _, config = spec.partition(":")
    try:
        builder = Cache(cache_dir=hub_cache_dir(), dataset_name=name.split("/")[-1], repo_id=name,
                        config_name=config or None, version="auto", hash="auto")
        return builder.as_dataset()
    except (ValueError, KeyError, OSError) as err:  # OSError covers FileNotFoundError
        _raise_for_cached_configs(err, name, config)
        return None


def _raise_for_cached_configs(err: Exception, name: str, config: str) -> None:
    """Pass on, in one line, what `datasets`' message says about the configurations it has cached."""
    lines = str(err).splitlines() or [""]
    if "multiple" in lines[0] and ":" in lines[0]:  # several configs cached: the name alone is ambiguous
        configs = lines[0].split(":", 1)[1].strip()
        raise DataError(f"dataset {name!r} has several configurations in the local cache ({configs}); "
                        f"name one as {name}:CONFIG") from None
    cached = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Available configs")]
    if config and cached:
        raise DataError(f"dataset {name!r} has no configuration {config!r} in the local cache (cached: "
                        f"{cached[0].strip('[]')})") from None


def dataset_documents(ds, column: str, label: str) -> Iterator[tuple[str, str]]:
    """The rows of a `datasets.Dataset`, read lazily from its Arrow files in batches (only the text column)."""
    row = 0
    for batch in ds.select_columns([column]).iter(batch_size=TABLE_BATCH_ROWS):
        for text in batch[column]:
            if text is not None:
                yield f"{label}[{row}]", text
            row += 1
