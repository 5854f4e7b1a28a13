"""Every test here starts from an empty set-up cache of the process-wide selector."""

import pytest

from slope.backends.select import SELECTOR


@pytest.fixture(autouse=True)
def fresh_setup_cache():
    SELECTOR.cache.clear()
    yield
    SELECTOR.cache.clear()
