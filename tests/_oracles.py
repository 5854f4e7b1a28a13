"""The one N:M oracle every test checks slope's masks against, written without slope.

Plain Python over one group at a time, in Python floats (float64: exact for the float32, float16 and
bfloat16 values the tests pass), with the rule stated once: in every group of `m` consecutive entries
along `dim`, keep the `n` of largest |score|; of equal ones, the lower index. It never calls
slope.masks, so a fault there cannot hide in the oracle too.
"""

from __future__ import annotations

import torch


def nm_mask_oracle(scores: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Bool mask of `scores`' shape: the N:M choice along `dim` (any dim, any number of dims).

    For a magnitude mask pass the weights; for Wanda's pass |W|·‖X‖ (in float64, where the product of
    two float32 numbers is exact).
    """
    moved = scores.detach().movedim(dim, -1)
    assert moved.shape[-1] % m == 0, f"{moved.shape[-1]} entries along dim {dim} do not split into groups of {m}"
    keep: list[bool] = []
    for group in moved.reshape(-1, m).tolist():
        order = sorted(range(m), key=lambda i: (-abs(group[i]), i))
        kept = set(order[:n])
        keep.extend(i in kept for i in range(m))
    return torch.tensor(keep, dtype=torch.bool).reshape(moved.shape).movedim(-1, dim)
