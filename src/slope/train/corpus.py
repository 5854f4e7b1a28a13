"""The corpora shipped inside the package (see `slope/data/CORPORA.txt` for origin and licence).

Each is an xz-compressed tar of plain-text works, one file per work. Named sources:

    shakespeare          39 works of Shakespeare: the default training corpus
    shakespeare-heldout  hamlet, twelfth_night, sonnets: whole works held out from training
    milton               7 works of Milton: an out-of-domain evaluation set
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from importlib import resources

# Whole works held out, so no scene or sonnet of the held-out text leaks into training.
HELDOUT_WORKS = ("hamlet_gut.txt", "twelfth_night_gut.txt", "sonnets_gut.txt")

# name -> (archive under slope/data, which members: "train", "heldout" or "all")
EMBEDDED = {
    "shakespeare": ("shakespeare.tar.xz", "train"),
    "shakespeare-heldout": ("shakespeare.tar.xz", "heldout"),
    "milton": ("milton.tar.xz", "all"),
}


# The validation set `data.val = "auto"` picks for an embedded training corpus.
HELDOUT_OF = {"shakespeare": "shakespeare-heldout"}


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
            held_out = member.name in HELDOUT_WORKS
            if which == "all" or (which == "heldout") == held_out:
                yield f"{name}:{member.name}", tar.extractfile(member).read().decode("utf-8")
