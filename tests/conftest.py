"""Shared test helpers: seeded random token batches (`random_tokens`)."""

import pytest
import torch


def _random_tokens(B: int, T: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    """(B, T) int64 token ids in [0, vocab), the same on every machine for a seed (torch's CPU generator)."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def random_tokens():
    """`random_tokens(B, T, seed=0, vocab=256)` -> (B, T) int64 ids in [0, vocab), reproducible per seed."""
    return _random_tokens
