"""Fixtures the io tests share: one tokenizer per module and a fixed batch of token ids."""

import pytest
import torch
from _export_fixtures import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def ids():
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
