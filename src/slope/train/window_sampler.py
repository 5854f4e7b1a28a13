"""`WindowSampler`: the training batches, random windows of a token file drawn from a checkpointable generator."""

from __future__ import annotations

import numpy as np
import torch

from slope.train.data_error import DataError
from slope.train.token_files import TokenFile


class WindowSampler:
    """Random windows of `seq_len + 1` tokens from a token file, with a checkpointable generator.

    Each batch is (inputs, targets), both (batch, seq_len) int64, targets shifted by one.

    In a run of `world` processes every rank draws the same global batch of `batch_size * world`
    window starts from the run seed and keeps its own slice (rank r: starts r*batch_size onwards), so
    the ranks' windows never overlap within a step and N ranks see exactly the windows one process
    with N times the batch sees. The generator state is the same on every rank, so a checkpoint holds
    one state for all of them.
    """

    def __init__(self, tokens: TokenFile, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"training text has {len(tokens)} tokens, fewer than one window of train.seq_len + 1 = "
                f"{seq_len + 1}; use more text or a shorter train.seq_len"
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world} processes")
        self.tokens = tokens.tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.seq_len  # exclusive: the last start leaves seq_len + 1 tokens
        starts = torch.randint(0, high, (self.batch_size * self.world,), generator=self.generator)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        windows = torch.from_numpy(windows)  # (batch, seq_len + 1)
        self.batches += 1
        return windows[:, :-1], windows[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches = state["batches"]
