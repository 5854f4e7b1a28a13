"""N:M masks as pure functions: selection, double (column) pruning, and compact bit packing.

Everything here is vectorised over groups: the only Python loops run over the `m` positions of a
group (at most `MAX_M`), never over groups, so a 4096x4096 mask costs a few elementwise passes.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from slope.config import MAX_M


def _grouped(shape: torch.Size, dim: int, m: int, what: str) -> tuple[int, int, int, int]:
    """Sizes (pre, groups, m, post) that view a tensor of `shape` as groups of `m` along `dim`."""
    size = shape[dim]
    if size % m:
        raise ValueError(
            f"{what}: dimension {dim} of shape {tuple(shape)} has size {size}, which is not a multiple "
            f"of m={m}; N:M groups need it to divide evenly"
        )
    pre = 1
    for s in shape[:dim]:
        pre *= s
    post = 1
    for s in shape[dim + 1 :]:
        post *= s
    return pre, size // m, m, post


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m <= MAX_M):
        raise ValueError(f"invalid N:M pattern n={n!r}, m={m!r}: expected integers with 1 <= n < m <= {MAX_M}")


def _keep_by_position(w: torch.Tensor, n: int, m: int, dim: int) -> tuple[list[torch.Tensor], torch.Size]:
    """For each position i of a group, a bool (pre, groups, post) tensor: is entry i kept?"""
    _check_nm(n, m)
    if w.dim() == 0:
        raise ValueError("an N:M mask needs a tensor with at least one dimension, got a scalar")
    dim = dim % w.dim()
    pre, groups, _, post = _grouped(w.shape, dim, m, f"N:M mask (n={n}, m={m})")
    # |w| in float32 is exact for fp16/bf16 and keeps the comparisons on one well-supported dtype.
    a = w.detach().abs().to(torch.float32 if w.element_size() <= 4 else w.dtype)
    cols = a.reshape(pre, groups, m, post).unbind(2)  # m tensors of (pre, groups, post)
    if (n, m) == (2, 4):
        return _keep_2_of_4(cols), w.shape
    # rank of entry i in its group = how many entries beat it; of two equal entries the one at the
    # lower index wins, which is exactly "ties go to the lower index". Each pair is compared once.
    ranks = [torch.zeros_like(cols[0], dtype=torch.uint8) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_beats_i = cols[j] > cols[i]
            ranks[i] += j_beats_i
            ranks[j] += ~j_beats_i
    return [rank < n for rank in ranks], w.shape


def _majority(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (a & b) | (c & (a | b))


def _keep_2_of_4(cols: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """2:4 fast path of `_keep_by_position`: entry i is dropped iff at least two of the other three
    beat it (a majority of three booleans), which needs only bool logic instead of rank sums.

    g[i, j] (i < j) = "j beats i" = |w_j| > |w_i|; "i beats j" is its negation (ties: lower index).
    Negations are folded through not(maj(a, b, c)) = maj(not a, not b, not c), leaving four.
    """
    g = {(i, j): cols[j] > cols[i] for i in range(4) for j in range(i + 1, 4)}
    return [
        ~_majority(g[0, 1], g[0, 2], g[0, 3]),  # beaten by 1, 2, 3 when they are larger
        _majority(g[0, 1], ~g[1, 2], ~g[1, 3]),  # beaten by 0 unless 1 is larger; by 2, 3 when larger
        _majority(g[0, 2], g[1, 2], ~g[2, 3]),
        _majority(g[0, 3], g[1, 3], g[2, 3]),  # 3 loses every tie: kept iff strictly above two others
    ]


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4, dim: int = -1) -> torch.Tensor:
    """Bool mask keeping the `n` largest-|w| entries of every `m` consecutive entries along `dim`.

    Ties go to the lower index. Works for any float dtype and device; the result has w's shape.
    """
    keep, shape = _keep_by_position(w, n, m, dim)
    return torch.stack(keep, dim=2).reshape(shape)


def nm_bits(w: torch.Tensor, n: int = 2, m: int = 4, dim: int = -1) -> torch.Tensor:
    """`pack_group_bits(nm_mask(w, n, m, dim), m, dim)`, without materialising the bool mask."""
    keep, shape = _keep_by_position(w, n, m, dim)
    dtype = bits_dtype(m)
    bits = torch.zeros_like(keep[0], dtype=dtype)
    for i, kept in enumerate(keep):
        bits |= kept.to(dtype) << i
    out_shape = list(shape)
    out_shape[dim % len(shape)] //= m
    return bits.reshape(out_shape)


def column_mask(w_r: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """M_C, the backward (column) mask: prune the row-pruned `w_r` (out, in) again along `out`.

    In every column and every group of `m` consecutive rows keep the `n` largest |w_r|. A group that
    already holds <= n non-zeros keeps all of them: zeros rank last, so the top-n always include
    every non-zero. Entries that are zero in `w_r` may be True in the mask; they stay zero in
    `w_r * mask`, which is all that is ever used.
    """
    if w_r.dim() != 2:
        raise ValueError(f"column_mask expects a 2-D (out, in) weight, got shape {tuple(w_r.shape)}")
    return nm_mask(w_r, n, m, dim=0)


def double_prune(w_r: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """W_RC = W_R ⊙ M_C: the operand of grad_input."""
    return w_r * column_mask(w_r, n, m)


def bits_dtype(m: int) -> torch.dtype:
    """Smallest integer dtype holding one bit per position of a group of `m`."""
    if m <= 8:
        return torch.uint8
    if m <= 16:
        return torch.int16
    if m <= 32:
        return torch.int32
    return torch.int64


def pack_group_bits(mask: torch.Tensor, m: int, dim: int = -1) -> torch.Tensor:
    """Pack a bool mask into one integer per group of `m` along `dim` (bit i = position i).

    Shape: `mask.shape` with `dim` divided by `m`. For 2:4 that is one byte per four weights.
    """
    dim = dim % mask.dim()
    pre, groups, _, post = _grouped(mask.shape, dim, m, "pack_group_bits")
    dtype = bits_dtype(m)
    grouped = mask.reshape(pre, groups, m, post).to(dtype)
    shifts = torch.arange(m, device=mask.device, dtype=dtype).view(1, 1, m, 1)
    packed = (grouped << shifts).sum(dim=2, dtype=torch.int64).to(dtype)  # bits are disjoint: sum == or
    out_shape = list(mask.shape)
    out_shape[dim] //= m
    return packed.reshape(out_shape)


def _bits_01(bits: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """(pre, groups, m, post) 0/1 integers of the packed `bits` along `dim`."""
    dim = dim % bits.dim()
    pre = 1
    for s in bits.shape[:dim]:
        pre *= s
    post = 1
    for s in bits.shape[dim + 1 :]:
        post *= s
    shifts = torch.arange(m, device=bits.device, dtype=bits.dtype).view(1, 1, m, 1)
    return (bits.reshape(pre, bits.shape[dim], 1, post) >> shifts) & 1


def unpack_group_bits(bits: torch.Tensor, m: int, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_group_bits`: the bool mask, `dim` multiplied by `m`."""
    out_shape = list(bits.shape)
    out_shape[dim % bits.dim()] *= m
    return _bits_01(bits, m, dim).to(torch.bool).reshape(out_shape)


def apply_group_bits(w: torch.Tensor, bits: torch.Tensor, m: int, dim: int = -1) -> torch.Tensor:
    """`w * unpack_group_bits(bits, m, dim)`, multiplying by the 0/1 bits directly (no bool tensor,
    which makes the product about twice as fast on CPU)."""
    keep = _bits_01(bits, m, dim)  # (pre, groups, m, post)
    return (w.reshape(keep.shape) * keep).reshape(w.shape)


def scatter_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense (out, in) tensor with `values` (out, k) at the True positions of `mask`, zeros elsewhere.

    Values are laid out row-major over the mask's True entries, the order `dense[mask]` returns,
    so `scatter_values(dense[mask].view(out, k), mask)` reproduces `dense * mask`.
    """
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter_(mask, values)


def gather_values(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The entries of `dense` (out, in) at `mask`, as (out, k) in `scatter_values` order."""
    return dense[mask].view(mask.shape[0], -1)


def _positions_table(n: int, m: int, device: torch.device) -> torch.Tensor:
    """(2**m, n) int64: row b lists the set bits of b in ascending order (rows with != n bits unused)."""
    key = (n, m, device)
    if key not in _POSITION_TABLES:
        with unset_fake_temporarily():  # a real constant even when first asked for under fake tensors
            _POSITION_TABLES[key] = _build_positions_table(n, m, device)
    return _POSITION_TABLES[key]


def _build_positions_table(n: int, m: int, device: torch.device) -> torch.Tensor:
    table = torch.zeros(2**m, n, dtype=torch.int64)
    for b in range(2**m):
        pos = [i for i in range(m) if b >> i & 1]
        if len(pos) == n:
            table[b] = torch.tensor(pos)
    return table.to(device)


_POSITION_TABLES: dict[tuple, torch.Tensor] = {}
_TABLE_MAX_M = 12  # a 4096-row table; wider groups sort their bits instead


def _positions_2_4(bits: torch.Tensor) -> torch.Tensor:
    """kept_positions for 2:4 by elementwise arithmetic: the lowest and the highest set bit."""
    b = bits.to(torch.uint8)
    low = ((b & 1) == 0).to(torch.uint8) + ((b & 3) == 0) + ((b & 7) == 0)  # trailing zeros
    high = (b >= 2).to(torch.uint8) + (b >= 4) + (b >= 8)  # index of the top bit
    return torch.stack([low, high], dim=-1).long()


def kept_positions(bits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Positions (0..m-1, ascending) of the `n` kept entries of every group of row bits.

    bits: (out, in/m) from `pack_group_bits(mask, m, dim=1)` with exactly n bits per group.
    Returns (out, in/m, n) int64, the index for `torch.gather` / `scatter_` on a (out, in/m, m) view:
    two table look-ups instead of boolean indexing, which is several times slower on CPU.
    """
    if bits.is_cuda and (n, m) == (2, 4):
        # On a GPU the table look-up runs as a gather kernel measured at several ms per large layer
        # (H200); arithmetic on the 4-bit codes is cheaper there. On a CPU the table is faster.
        return _positions_2_4(bits)
    if m <= _TABLE_MAX_M:
        table = _positions_table(n, m, bits.device)  # index_select is ~4x faster than table[bits]
        return table.index_select(0, bits.reshape(-1).long()).view(*bits.shape, n)
    grouped = unpack_group_bits(bits, m, dim=-1).view(*bits.shape, m).to(torch.uint8)
    return torch.sort(grouped, dim=-1, descending=True, stable=True).indices[..., :n]


def scatter_kept(values: torch.Tensor, positions: torch.Tensor, m: int) -> torch.Tensor:
    """Dense (out, in) from kept `values` (out, k) at `positions` (out, in/m, n); equals `scatter_values`."""
    out, groups, n = positions.shape
    dense = torch.zeros(out, groups, m, dtype=values.dtype, device=values.device)
    return dense.scatter_(2, positions, values.view(out, groups, n)).view(out, groups * m)


def gather_kept(dense: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The entries of `dense` (out, in) at `positions` (out, in/m, n) as (out, k); equals `gather_values`."""
    out, groups, n = positions.shape
    return dense.view(out, groups, -1).gather(2, positions).view(out, groups * n)
