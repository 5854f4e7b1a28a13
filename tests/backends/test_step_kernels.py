"""The fused per-step kernels (slope.backends.step_kernels) in Triton's interpreter on CPU.

Every kernel runs under TRITON_INTERPRET=1 against float64 expectations built here with plain loops
over rows, groups and columns (not the module's own references), on layers whose masks are random
valid 2:4 masks and whose values have many exact ties and zeros. Then the dispatcher (switch,
fallbacks, CPU without the interpreter) and one layer trained with the kernels on and off.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

from slope import SlopeConfig, SlopeLinear, track_steps
from slope.backends import step_kernels

pytest.importorskip("triton")

# (out, in): tiny, tall, wide, and larger than one tile (64 columns x 32 row groups) in both directions,
# with partial tiles at both edges
SHAPES = [(4, 4), (16, 8), (8, 40), (136, 200)]


@pytest.fixture
def interpret(monkeypatch):
    """Kernels in Triton's interpreter for this test, from a fresh kernel module and verdicts."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(step_kernels.ENV_SWITCH, raising=False)
    step_kernels.reset()
    yield
    step_kernels.reset()


@functools.cache
def random_layer(out_f, in_f, seed=0, dtype=torch.float32):
    """values (out, in/2), row_bits (out, in/4) of a random valid 2:4 M_R, and W_R (out, in) in float64.

    Values are half-integers in [-1.5, 1.5] (ties, zeros, equal magnitudes of both signs) mixed with
    normals, so every group sees exact ties; each row group keeps 2 random positions of 4.
    Cached (tests only read these tensors): the loops below are slow for the larger shapes.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, (out_f, in_f // 2), generator=gen).double() / 2
    w = torch.where(torch.rand(w.shape, generator=gen) < 0.6, w, torch.randn(w.shape, generator=gen, dtype=torch.float64))
    values = w.to(dtype)
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    choice = torch.randint(0, len(pairs), (out_f, in_f // 4), generator=gen)
    bits = [[(1 << pairs[c][0]) | (1 << pairs[c][1]) for c in row] for row in choice.tolist()]
    vals = values.double().tolist()
    w_r = [[0.0] * in_f for _ in range(out_f)]
    for r in range(out_f):
        kept = [j for j in range(in_f) if bits[r][j // 4] >> (j % 4) & 1]  # ascending: the storage order
        for slot, j in enumerate(kept):
            w_r[r][j] = vals[r][slot]
    return values, torch.tensor(bits, dtype=torch.uint8).view(out_f, in_f // 4), torch.tensor(w_r, dtype=torch.float64)


def expected_col_bits(w_r):
    """M_C by sorting each group of four rows: larger |W_R| first, of equal ones the lower row."""
    out_f, in_f = w_r.shape
    a = w_r.abs().tolist()
    bits = [[0] * in_f for _ in range(out_f // 4)]
    for g in range(out_f // 4):
        for j in range(in_f):
            order = sorted(range(4), key=lambda p: (-a[4 * g + p][j], p))
            bits[g][j] = (1 << order[0]) | (1 << order[1])
    return torch.tensor(bits, dtype=torch.uint8).view(out_f // 4, in_f)


def expected_gi(w_r, col_bits):
    """W_RCᵀ's kept values (in, out/2): row j, group g: W_R at the two kept rows, lower row first."""
    out_f, in_f = w_r.shape
    w, cb = w_r.tolist(), col_bits.tolist()
    gi = [[0.0] * (out_f // 2) for _ in range(in_f)]
    for j in range(in_f):
        for g in range(out_f // 4):
            rows = [4 * g + p for p in range(4) if cb[g][j] >> p & 1]
            gi[j][2 * g], gi[j][2 * g + 1] = w[rows[0]][j], w[rows[1]][j]
    return torch.tensor(gi, dtype=torch.float64).view(in_f, out_f // 2)


def random_col_bits(out_f, in_f, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    codes = torch.tensor([3, 5, 6, 9, 10, 12], dtype=torch.uint8)
    return codes[torch.randint(0, 6, (out_f // 4, in_f), generator=gen)]


def assert_matches(got, want64):
    """Exact, except bf16: Triton's interpreter casts fp32 -> bf16 by truncating the low bits while
    GPUs (and torch) round to nearest, so there the result may differ from torch's cast by one bf16
    ulp (toward zero); bf16 is compared within one ulp of the exact value."""
    if got.dtype != torch.bfloat16:
        assert torch.equal(got, want64.to(got.dtype))
        return
    exponent = torch.frexp(want64).exponent
    ulp = torch.where(want64 == 0, torch.zeros_like(want64), torch.ldexp(torch.ones_like(want64), exponent - 8))
    assert ((got.double() - want64).abs() <= ulp).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("values_dtype", "dtype"), [
    (torch.float32, torch.float16), (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float64, torch.float64),
])
def test_refresh_operands_writes_both_prefixes(interpret, shape, values_dtype, dtype):
    out_f, in_f = shape
    values, row_bits, w_r = random_layer(out_f, in_f, seed=out_f + in_f, dtype=values_dtype)
    col_bits = random_col_bits(out_f, in_f, seed=out_f)  # any valid M_C: it need not come from W_R
    out_prefix = torch.full((out_f, in_f // 2), 7.0, dtype=dtype)  # 7: what a missed write would leave
    gi_prefix = torch.full((in_f, out_f // 2), 7.0, dtype=dtype)
    assert step_kernels.uses_triton("refresh_operands", values.device, values_dtype, dtype)
    step_kernels.refresh_operands(values, row_bits, col_bits, out_prefix, gi_prefix)
    assert_matches(out_prefix, values.double())
    assert_matches(gi_prefix, expected_gi(w_r, col_bits))
    # one prefix alone: the other buffer is not touched
    gi_only = torch.full_like(gi_prefix, 7.0)
    step_kernels.refresh_operands(values, row_bits, col_bits, None, gi_only)
    assert torch.equal(gi_only, gi_prefix)
    out_only = torch.full_like(out_prefix, 7.0)
    step_kernels.refresh_operands(values, row_bits, None, out_only, None)
    assert torch.equal(out_only, out_prefix)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compact_grad_keeps_the_entries_at_m_r(interpret, shape, grad_dtype):
    out_f, in_f = shape
    _, row_bits, _ = random_layer(out_f, in_f, seed=in_f)
    grad = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)).to(grad_dtype)
    want = torch.zeros(out_f, in_f // 2, dtype=torch.float64)
    for r in range(out_f):
        kept = [j for j in range(in_f) if row_bits[r, j // 4] >> (j % 4) & 1]
        want[r] = grad[r, kept].double()
    assert step_kernels.uses_triton("compact_grad", grad.device, grad_dtype, torch.float32)
    got = step_kernels.compact_grad(grad, row_bits, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_column_refresh_equals_the_sorted_selection_with_ties_and_zeros(interpret, shape, dtype):
    out_f, in_f = shape
    values, row_bits, w_r = random_layer(out_f, in_f, seed=3 * out_f + in_f)
    want_bits = expected_col_bits(w_r)
    assert step_kernels.uses_triton("column_refresh", values.device, torch.float32, dtype)
    gi_prefix = torch.full((in_f, out_f // 2), 7.0, dtype=dtype)
    bits = step_kernels.column_refresh(values, row_bits, gi_prefix)
    assert bits.dtype == torch.uint8 and torch.equal(bits, want_bits)
    assert_matches(gi_prefix, expected_gi(w_r, want_bits))
    assert torch.equal(step_kernels.column_refresh(values, row_bits), want_bits)  # without the operand


def test_column_refresh_on_all_ties_and_all_zeros(interpret):
    """Columns of four equal magnitudes (signs mixed), and of zeros only, keep rows 0 and 1."""
    out_f, in_f = 8, 8
    row_bits = torch.full((out_f, in_f // 4), 0b0101, dtype=torch.uint8)  # positions 0 and 2 kept
    values = torch.zeros(out_f, in_f // 2)
    values[:4] = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(4, 1)  # group 0: |w| = 1 everywhere kept
    bits = step_kernels.column_refresh(values, row_bits)
    assert bits.tolist() == [[3] * in_f, [3] * in_f]


# ---- dispatcher ------------------------------------------------------------------------------


def reference_refresh(values, row_bits, col_bits, dtype):
    out_prefix = torch.empty(values.shape, dtype=dtype)
    gi_prefix = torch.empty(values.shape[1] * 2, values.shape[0] // 2, dtype=dtype)
    step_kernels.refresh_operands_reference(values, row_bits, col_bits, out_prefix, gi_prefix)
    return out_prefix, gi_prefix


def test_the_switch_turns_the_kernels_off(interpret, monkeypatch):
    monkeypatch.setenv(step_kernels.ENV_SWITCH, "0")
    monkeypatch.setitem(step_kernels.LAUNCHES, "compact_grad", lambda *a: pytest.fail("Triton launched"))
    _, row_bits, _ = random_layer(8, 16)
    grad = torch.randn(8, 16)
    assert not step_kernels.uses_triton("compact_grad", grad.device, grad.dtype, torch.float32)
    assert torch.equal(step_kernels.compact_grad(grad, row_bits, torch.float32),
                       step_kernels.compact_grad_reference(grad, row_bits, torch.float32))


def test_cpu_tensors_without_the_interpreter_use_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(step_kernels.ENV_SWITCH, raising=False)
    step_kernels.reset()
    monkeypatch.setattr(step_kernels, "kernels", lambda: pytest.fail("triton imported for CPU tensors"))
    values, row_bits, w_r = random_layer(8, 16)
    assert not step_kernels.uses_triton("column_refresh", values.device, values.dtype, values.dtype)
    assert torch.equal(step_kernels.column_refresh(values, row_bits), expected_col_bits(w_r))
    step_kernels.reset()


@pytest.mark.parametrize("fault", ["wrong values", "raises"])
def test_a_failing_kernel_falls_back_to_the_reference_and_says_so_once(interpret, monkeypatch, caplog, fault):
    def planted(mod, values, row_bits, col_bits, out_prefix, gi_prefix):
        if fault == "raises":
            raise RuntimeError("planted")
        step_kernels._launch_refresh(mod, values, row_bits, col_bits, out_prefix, gi_prefix)
        gi_prefix[0, 0] += 1  # one wrong value

    monkeypatch.setitem(step_kernels.LAUNCHES, "refresh_operands", planted)
    values, row_bits, _ = random_layer(8, 16)
    col_bits = random_col_bits(8, 16, seed=0)
    want = reference_refresh(values, row_bits, col_bits, torch.float32)
    with caplog.at_level(logging.WARNING, logger=step_kernels.__name__):
        for _ in range(2):
            got = reference_refresh(values, row_bits, col_bits, torch.float32)
            [t.fill_(7) for t in got]
            step_kernels.refresh_operands(values, row_bits, col_bits, *got)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "refresh_operands" in lines[0] and "plain torch path" in lines[0]
    assert not step_kernels.uses_triton("refresh_operands", values.device, torch.float32, torch.float32)


def test_a_kernel_failing_after_its_self_check_falls_back_too(interpret, monkeypatch, caplog):
    calls = []

    def fails_after_the_self_check(mod, grad_w, row_bits, out_dtype):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("planted: out of resources")
        return step_kernels._launch_compact(mod, grad_w, row_bits, out_dtype)

    monkeypatch.setitem(step_kernels.LAUNCHES, "compact_grad", fails_after_the_self_check)
    _, row_bits, _ = random_layer(8, 16)
    grad = torch.randn(8, 16)
    want = step_kernels.compact_grad_reference(grad, row_bits, torch.float32)
    with caplog.at_level(logging.WARNING, logger=step_kernels.__name__):
        assert torch.equal(step_kernels.compact_grad(grad, row_bits, torch.float32), want)
        assert torch.equal(step_kernels.compact_grad(grad, row_bits, torch.float32), want)
    assert len(calls) == 2 and len(caplog.records) == 1  # self-check, one failed launch, then the reference


# ---- one layer trained with the kernels on and off --------------------------------------------


def train(steps=3):
    """Outputs, grads and M_C of an emulated fp32 layer (backward_mask_interval 2) over `steps`
    AdamW steps, plus one more forward without grad; and the layer's operand store."""
    torch.manual_seed(0)
    layer = SlopeLinear.from_dense(nn.Linear(64, 32), SlopeConfig(backend="emulated", backward_mask_interval=2))
    opt = track_steps(torch.optim.AdamW(layer.parameters(), lr=0.05))
    x = torch.randn(2, 8, 64, requires_grad=True)
    record = []
    for _ in range(steps):
        y = layer(x)
        x.grad = None
        opt.zero_grad()
        (y.square().sum() + y.sum()).backward()
        record.append((y.detach(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone(), layer.col_bits.clone()))
        opt.step()
    with torch.no_grad():  # a training forward would refresh W_RCᵀ too (with the kernels), unused
        record.append((layer(x),))
    return record, layer.runtime.placements()[0].store


def test_training_with_the_kernels_equals_training_without(interpret, monkeypatch):
    launched = {name: 0 for name in step_kernels.LAUNCHES}

    def counting(name, launch):
        def run(*args):
            launched[name] += 1
            return launch(*args)
        return run

    for name, launch in list(step_kernels.LAUNCHES.items()):
        monkeypatch.setitem(step_kernels.LAUNCHES, name, counting(name, launch))
    on, store_on = train()
    monkeypatch.setenv(step_kernels.ENV_SWITCH, "0")
    off, store_off = train()
    for step, (a, b) in enumerate(zip(on, off, strict=True)):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)), f"step {step}"
    assert store_on.rebuilds == store_off.rebuilds
    # the kernels did the work: W_RCᵀ refreshed without an index map, dW compacted by the kernel
    assert store_on._grad_input_index is None and store_off._grad_input_index is not None
    assert launched["refresh_operands"] >= 3 and launched["compact_grad"] >= 3


# ---- compiled for a GPU, without one ----------------------------------------------------------

REFRESH_SIGNATURE = {"values_ptr": "*fp32", "row_bits_ptr": "*u8", "col_bits_ptr": "*u8", "out_ptr": "*bf16", "gi_ptr": "*bf16",
                     "out_features": "i32", "in_features": "i32", "out_programs": "i32",
                     "BLOCK": "constexpr", "BLOCK_J": "constexpr", "BLOCK_G": "constexpr"}
COMPACT_SIGNATURE = {"grad_ptr": "*bf16", "row_bits_ptr": "*u8", "out_ptr": "*fp32", "out_features": "i32", "in_features": "i32",
                     "BLOCK": "constexpr"}
COLUMN_SIGNATURE = {"values_ptr": "*fp32", "row_bits_ptr": "*u8", "col_bits_ptr": "*u8", "gi_ptr": "*bf16", "out_features": "i32",
                    "in_features": "i32", "WRITE_GI": "constexpr", "BLOCK_J": "constexpr", "BLOCK_G": "constexpr"}


def test_the_kernels_compile_for_sm90(monkeypatch):
    """The interpreter runs Python, not the compiler: a kernel can pass every test above and still
    not compile (it once bound one name to blocks of two shapes in the two branches of an `if`).
    So compile each for an H100/H200 (sm90) to a cubin here, which needs no GPU."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, stated to silence its warning
    step_kernels.reset()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler.errors import CompilationError
    except ImportError as e:
        pytest.skip(f"this triton has no offline compile API: {e}")
    mod = step_kernels.kernels()
    bj, bg = step_kernels.BLOCK_J, step_kernels.BLOCK_G
    cases = [
        (mod.refresh_kernel, REFRESH_SIGNATURE, {(8,): step_kernels.BLOCK, (9,): bj, (10,): bg}),
        (mod.compact_kernel, COMPACT_SIGNATURE, {(5,): step_kernels.BLOCK}),
        (mod.column_kernel, COLUMN_SIGNATURE, {(6,): True, (7,): bj, (8,): bg}),
    ]
    for fn, signature, constexprs in cases:
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        except CompilationError:
            raise
        except Exception as e:  # no ptxas in this triton, or another toolchain problem: not the kernel's
            pytest.skip(f"cannot compile for sm90 offline here: {e!r}"[:300])
        assert compiled.asm["cubin"]
    step_kernels.reset()
