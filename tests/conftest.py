"""Shared by every test folder: pytest puts this folder on sys.path, so `_export_fixtures`, `_oracles`
and `_tolerances` import anywhere."""

import os

import pytest

# Tests marked `slow` (multi-process kills, resumes at another world size, hung ranks: minutes on two
# cores) run only when asked: SLOPE_SLOW_TESTS=1 python -m pytest -m slow. The default run keeps one
# DDP and one FSDP equivalence test and a failing-rank test.
RUN_SLOW = os.environ.get("SLOPE_SLOW_TESTS", "").strip().lower() in ("1", "true", "yes")

# Under pytest-xdist (the default: pyproject's addopts) each worker gets its share of the cores, so that
# the workers' torch thread pools do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_collection_modifyitems(config, items):
    if RUN_SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set SLOPE_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---- the training text every `slope train` in the tests reads ------------------------------------------


def shakespeare_text(chars: int) -> str:
    """The first `chars` characters of Macbeth, from the corpus shipped in the package."""
    from slope.train import corpus

    return dict(corpus.embedded_documents("shakespeare"))["shakespeare:macbeth_gut.txt"][:chars]


def milton_text(chars: int) -> str:
    """The first `chars` characters of the first Milton work shipped in the package (out of domain)."""
    from slope.train import corpus

    return next(text for _, text in corpus.embedded_documents("milton"))[:chars]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """text_corpus(train_chars=60_000, ood_chars=0): a folder holding train.txt (the first train_chars
    characters of Macbeth: ~60 kB trains a tokenizer in a few seconds) and, with ood_chars, ood.txt
    (Milton, an extra evaluation set). Written once per size in the session; tests only read it (a run's
    token cache goes to its own run directory)."""
    made = {}

    def folder(train_chars: int = 60_000, ood_chars: int = 0):
        if (train_chars, ood_chars) not in made:
            root = tmp_path_factory.mktemp(f"corpus-{train_chars}-{ood_chars}")
            (root / "train.txt").write_text(shakespeare_text(train_chars))
            if ood_chars:
                (root / "ood.txt").write_text(milton_text(ood_chars))
            made[train_chars, ood_chars] = root
        return made[train_chars, ood_chars]

    return folder
