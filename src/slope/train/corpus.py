"""The corpora shipped inside the package (see `slope/data/CORPORA.txt` for origin and licence).

Each is an xz-compressed tar of plain-text works, one file per work. Named sources:

    shakespeare          39 works of Shakespeare: the default training corpus
    shakespeare-heldout  hamlet, twelfth_night, sonnets: whole works held out from training
    milton               7 works of Milton: an out-of-domain evaluation set
    shakespeare-small    2 comedies of the 39 (185 kB): the smoke run's training text
    sonnets              the sonnets (96 kB), one of the held-out works: the smoke run's validation
    milton-small         L'Allegro, Il Penseroso, Comus and Lycidas (67 kB): the smoke run's extra set

The small ones make `--config tiny` a run of seconds end to end: tokenizer training and tokenizing
the full corpora would otherwise take most of its time.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from importlib import resources

# Whole works held out, so no scene or sonnet of the held-out text leaks into training.
HELDOUT_WORKS = ("hamlet_gut.txt", "twelfth_night_gut.txt", "sonnets_gut.txt")

# name -> (archive under slope/data, which members: "train", "heldout", "all" or a tuple of file names)
EMBEDDED = {
    "shakespeare": ("shakespeare.tar.xz", "train"),
    "shakespeare-heldout": ("shakespeare.tar.xz", "heldout"),
    "milton": ("milton.tar.xz", "all"),
    "shakespeare-small": ("shakespeare.tar.xz", ("comedy_of_errors_gut.txt", "midsummer_nights_dream_gut.txt")),
    "sonnets": ("shakespeare.tar.xz", ("sonnets_gut.txt",)),
    "milton-small": ("milton.tar.xz", ("lallegro_il_penseroso_comus_and_lycidas_gut.txt",)),
}


# The validation set `data.val = "auto"` picks for an embedded training corpus.
HELDOUT_OF = {"shakespeare": "shakespeare-heldout", "shakespeare-small": "sonnets"}


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def embedded_archive(name: str):
    """A path-like to the archive of embedded corpus `name` (for hashing and reading)."""
    return resources.files("slope") / "data" / EMBEDDED[name][0]


def embedded_documents(name: str) -> Iterator[tuple[str, str]]:
    """(work name, text) of every work of embedded corpus `name`, in sorted order."""
    which = EMBEDDED[name][1]
    with resources.as_file(embedded_archive(name)) as path, tarfile.open(path, "r:xz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            if isinstance(which, tuple):
                chosen = member.name in which
            else:
                chosen = which == "all" or (which == "heldout") == (member.name in HELDOUT_WORKS)
            if chosen:
                yield f"{name}:{member.name}", tar.extractfile(member).read().decode("utf-8")
