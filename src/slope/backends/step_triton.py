"""The Triton kernels behind `slope.backends.step_kernels`; that module is the only one importing this.

Imported (and, when TRITON_INTERPRET changes, imported again) by `step_kernels.kernels()` only:
`triton.jit` decides at decoration time whether a kernel runs compiled or in Triton's interpreter,
so importing this module is what fixes the mode. For the same reason the kernels use only
`triton.language` builtins, none of its own jit functions (`tl.cdiv`, `tl.interleave`, ...): those
were decorated when triton was imported, and stay compiled-only if TRITON_INTERPRET was set later. Nothing here checks its inputs: the dispatchers in
`step_kernels` pass contiguous tensors of the 2:4 storage shapes.

Storage of a layer (out, in), 2:4:
    values    (out, in/2)  kept weights, row-major in position order
    row_bits  (out, in/4)  M_R, bit p of (r, g) set iff W[r, 4g+p] is kept (exactly 2 per byte)
    col_bits  (out/4, in)  M_C, bit p of (g, j) set iff W_R[4g+p, j] is kept (exactly 2 per byte)
Offsets are computed in int64: a (65536, 65536) layer has more elements than int32 counts.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _low(bits):
    """Index of the lower of the two set bits of a 4-bit code: its trailing zeros."""
    return ((bits & 1) == 0).to(tl.int32) + ((bits & 3) == 0).to(tl.int32) + ((bits & 7) == 0).to(tl.int32)


@triton.jit
def _high(bits):
    """Index of the higher of the two set bits of a 4-bit code: its top bit."""
    return (bits >= 2).to(tl.int32) + (bits >= 4).to(tl.int32) + (bits >= 8).to(tl.int32)


@triton.jit
def _w_r(values_ptr, row_bits_ptr, r, j, in_features, mask):
    """W_R[r, j] read from the stored values: 0 where M_R drops it.

    A kept entry's slot in its row of values is 2 per earlier group plus the kept positions below
    it in its own group (a popcount of at most 3 bits).
    """
    g = j // 4
    p = j % 4
    rb = tl.load(row_bits_ptr + r * (in_features // 4) + g, mask=mask, other=0).to(tl.int32)
    kept = ((rb >> p) & 1) != 0
    below = rb & ((1 << p) - 1)
    slot = 2 * g + (below & 1) + ((below >> 1) & 1) + ((below >> 2) & 1)
    return tl.load(values_ptr + r * (in_features // 2) + slot, mask=mask & kept, other=0.0)


@triton.jit
def _tile(tile, out_features, in_features, BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr):
    """Column indices j (BLOCK_J, 1) and row-group indices g (1, BLOCK_G) of one tile, and its bounds."""
    n_j = (in_features + BLOCK_J - 1) // BLOCK_J  # not tl.cdiv (see the module docstring)
    j = ((tile % n_j) * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)[:, None]
    g = ((tile // n_j) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)[None, :]
    return j, g, (j < in_features) & (g < out_features // 4)


@triton.jit
def _store_gi(gi_ptr, j, g, out_features, v0, v1, mask):
    """W_RCᵀ (in, out) row j, group g: its two kept values (lower row first) at slots 2g, 2g+1.

    Interleaved into (BLOCK_J, 2·BLOCK_G) so that each row of the tile is one contiguous store.
    """
    base = j * (out_features // 2) + 2 * g
    offs = _interleave(base, base + 1)
    v = _interleave(v0, v1).to(gi_ptr.dtype.element_ty)
    m8 = mask.to(tl.int8)  # join/reshape on int8 rather than on 1-bit booleans, the better-trodden path
    tl.store(gi_ptr + offs, v, mask=_interleave(m8, m8) != 0)


@triton.jit
def _interleave(a, b):
    """(R, C), (R, C) -> (R, 2C): a0 b0 a1 b1 ... (tl.interleave, from builtins only)."""
    return tl.reshape(tl.join(a, b), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _cast_block(values_ptr, out_ptr, block, n, BLOCK: tl.constexpr):
    """out[i] = values[i] cast to out's dtype for the `block`-th BLOCK elements of n."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(values_ptr + offs, mask=m).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _grad_input_tile(values_ptr, row_bits_ptr, col_bits_ptr, gi_ptr, tile, out_features, in_features,
             BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr):
    """W_RCᵀ's kept values of one tile: for each (j, g), W_R at the two rows M_C keeps."""
    j, g, m = _tile(tile, out_features, in_features, BLOCK_J, BLOCK_G)
    # masked lanes read code 3 (rows 0 and 1), so the row indices below stay in range
    cb = tl.load(col_bits_ptr + g * in_features + j, mask=m, other=3).to(tl.int32)
    v0 = _w_r(values_ptr, row_bits_ptr, 4 * g + _low(cb), j, in_features, m)
    v1 = _w_r(values_ptr, row_bits_ptr, 4 * g + _high(cb), j, in_features, m)
    _store_gi(gi_ptr, j, g, out_features, v0, v1, m)


@triton.jit
def refresh_kernel(values_ptr, row_bits_ptr, col_bits_ptr, out_ptr, gi_ptr,
                   out_features, in_features, out_programs,
                   BLOCK: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr):
    """Programs [0, out_programs) cast the values into the output operand's prefix (a flat copy);
    the others write W_RCᵀ's kept values, one (BLOCK_J columns x BLOCK_G row groups) tile each.
    Each branch is a function of its own: the compiler wants a name bound in both branches of an
    `if` to have one type, and the two work on differently shaped blocks."""
    pid = tl.program_id(0)
    if pid < out_programs:
        _cast_block(values_ptr, out_ptr, pid, out_features.to(tl.int64) * (in_features // 2), BLOCK)
    else:
        _grad_input_tile(values_ptr, row_bits_ptr, col_bits_ptr, gi_ptr, pid - out_programs, out_features, in_features,
                 BLOCK_J, BLOCK_G)


@triton.jit
def compact_kernel(grad_ptr, row_bits_ptr, out_ptr, out_features, in_features, BLOCK: tl.constexpr):
    """out (out, in/2)[r, 2g+q] = grad (out, in)[r, 4g + (lower, higher)[q] kept position of (r, g)]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    half = in_features // 2
    m = offs < out_features.to(tl.int64) * half
    r = offs // half
    k = offs % half
    g = k // 2
    rb = tl.load(row_bits_ptr + r * (in_features // 4) + g, mask=m, other=3).to(tl.int32)
    p = tl.where(k % 2 == 0, _low(rb), _high(rb))
    v = tl.load(grad_ptr + r * in_features + 4 * g + p, mask=m)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _maj(a, b, c):
    return (a & b) | (c & (a | b))


@triton.jit
def column_kernel(values_ptr, row_bits_ptr, col_bits_ptr, gi_ptr, out_features, in_features,
                  WRITE_GI: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_G: tl.constexpr):
    """M_C of W_R from the stored values, and (WRITE_GI) W_RCᵀ's kept values of that new mask.

    The selection is `masks._keep_2_of_4` on |W_R| down a group of four rows: entry i is dropped
    iff two of the other three beat it, and of two equal entries the lower row wins. Entries M_R
    drops read as 0, so they rank last, as in `nm_bits(W_R, 2, 4, dim=0)`.
    """
    j, g, m = _tile(tl.program_id(0), out_features, in_features, BLOCK_J, BLOCK_G)
    r = 4 * g
    w0 = _w_r(values_ptr, row_bits_ptr, r, j, in_features, m)
    w1 = _w_r(values_ptr, row_bits_ptr, r + 1, j, in_features, m)
    w2 = _w_r(values_ptr, row_bits_ptr, r + 2, j, in_features, m)
    w3 = _w_r(values_ptr, row_bits_ptr, r + 3, j, in_features, m)
    a0, a1, a2, a3 = tl.abs(w0), tl.abs(w1), tl.abs(w2), tl.abs(w3)
    g01, g02, g03 = a1 > a0, a2 > a0, a3 > a0  # "the later row beats the earlier one"
    g12, g13, g23 = a2 > a1, a3 > a1, a3 > a2
    k0 = _maj(g01, g02, g03) == 0
    k1 = _maj(g01, g12 == 0, g13 == 0)
    k2 = _maj(g02, g12, g23 == 0)
    k3 = _maj(g03, g13, g23)
    bits = k0.to(tl.int32) | (k1.to(tl.int32) << 1) | (k2.to(tl.int32) << 2) | (k3.to(tl.int32) << 3)
    tl.store(col_bits_ptr + g * in_features + j, bits.to(tl.uint8), mask=m)
    if WRITE_GI:
        lo, hi = _low(bits), _high(bits)
        v0 = tl.where(lo == 0, w0, tl.where(lo == 1, w1, w2))
        v1 = tl.where(hi == 3, w3, tl.where(hi == 2, w2, w1))
        _store_gi(gi_ptr, j, g, out_features, v0, v1, m)
