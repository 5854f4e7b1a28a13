"""The documents point only at things that exist: files and folders named in inline code, and links.

Scans README.md and docs/*.md. A reference is checked when it names a repository path: it starts with a
top-level folder (`src/`, `docs/`, `benchmarks/`, `configs/`, `tests/`, `examples/`), with `slope/` (under
src/), with a sub-package of slope (`train/sources.py`, `backends/`), or is a `.py` file name. Placeholders
(`<run.name>`, `step_XXXXXXXX`) and paths of a run directory are not repository paths and are skipped.
"""

from __future__ import annotations

import re
from itertools import product
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "slope"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_LEVEL = ("src", "docs", "benchmarks", "configs", "tests", "examples")
SUBPACKAGES = tuple(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _expand(token: str) -> list[str]:
    """`a.{json,md}` -> a.json, a.md (the brace lists documents use for sibling files)."""
    parts = re.split(r"\{([^{}]*,[^{}]*)\}", token)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in product(*choices)]


def _candidates(token: str) -> list[Path] | None:
    """Where `token` would be if it is a repository path, or None when it is not one."""
    token = token.strip().rstrip(".,;:")
    if " " in token or "<" in token or "XXXX" in token or "..." in token or token.startswith(("/", "~", "-")):
        return None
    path = token.split("::", 1)[0]
    first = path.split("/", 1)[0]
    if "/" in path and first in TOP_LEVEL:
        return [ROOT / path]
    if path.startswith("slope/"):
        return [ROOT / "src" / path]
    if "/" in path and first in SUBPACKAGES:
        return [PACKAGE / path]
    if "/" not in path and path.endswith(".py"):  # a module named by its file alone, e.g. `masks.py`
        return [*PACKAGE.rglob(path), *(ROOT / "benchmarks").rglob(path), *(ROOT / "examples").rglob(path)] or [
            PACKAGE / path]
    return None


def _exists(path: Path) -> bool:
    if "*" in str(path):
        return any(ROOT.glob(str(path.relative_to(ROOT))))
    if path.exists():
        return True
    # `io/checkpoint.save_checkpoint`: a function, named after its module's path
    stem, dot, name = path.name.partition(".")
    module = path.with_name(stem + ".py")
    return bool(dot) and path.suffix != ".py" and module.is_file() and f"def {name}(" in module.read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", text))


def _anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def broken_references(doc: Path) -> list[str]:
    """Every reference of `doc` that points at nothing, as 'file:line: `ref`: why'."""
    text = doc.read_text()
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # code blocks are commands, not references
    found = []

    def line_of(pos: int) -> int:
        return prose.count("\n", 0, pos) + 1

    for match in INLINE.finditer(prose):
        for token in _expand(match.group(1)):
            candidates = _candidates(token)
            if candidates is None:
                continue
            target = token.split("::", 1)
            if not any(_exists(c) for c in candidates):
                found.append(f"{doc.name}:{line_of(match.start())}: `{token}` does not exist")
            elif len(target) == 2 and candidates[0].is_file():  # a pytest node: the test must exist too
                name = target[1].split("::")[-1].split("[")[0]
                if f"def {name}(" not in candidates[0].read_text():
                    found.append(f"{doc.name}:{line_of(match.start())}: `{token}`: no test {name} in it")
    for match in LINK.finditer(prose):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not repository files
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists():
            found.append(f"{doc.name}:{line_of(match.start())}: link ({target}) points at nothing")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            found.append(f"{doc.name}:{line_of(match.start())}: link ({target}): no heading #{anchor} in {path.name}")
    return found


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_references_exist(doc):
    assert broken_references(doc) == []


def test_no_document_cites_a_design_file():
    # The design notes are not part of the repository: a document must not send readers to them.
    markdown = [p for p in ROOT.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    citing = [f"{p.relative_to(ROOT)}:{n}" for p in markdown
              for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if "DESIGN" in line]
    assert citing == []


def test_a_planted_bad_reference_is_found(tmp_path):
    """The checker itself: a missing file, a missing test, a dead link and a dead anchor are each reported."""
    doc = tmp_path / "planted.md"
    doc.write_text(
        "# Title\n\n"
        "See `src/slope/train/sources.py` and `train/logs.py` and `masks.py`, `slope/io/`, `configs/*.toml`.\n"
        "Not checked: `runs/<run.name>/`, `RUN_DIR/metrics.jsonl`, `--data.train=x.txt`.\n"
        "```\nslope train --data.train=src/slope/nothing.py\n```\n"
        "Broken: `src/slope/train/nope.py`, `benchmarks/results/missing.{json,md}`,\n"
        "`tests/test_docs.py::test_not_here`, [guide](no_such.md), [here](#no-such-heading), [ok](#title).\n"
    )
    assert broken_references(doc) == [
        "planted.md:8: `src/slope/train/nope.py` does not exist",
        "planted.md:8: `benchmarks/results/missing.json` does not exist",
        "planted.md:8: `benchmarks/results/missing.md` does not exist",
        "planted.md:9: `tests/test_docs.py::test_not_here`: no test test_not_here in it",
        "planted.md:9: link (no_such.md) points at nothing",
        "planted.md:9: link (#no-such-heading): no heading #no-such-heading in planted.md",
    ]
