"""Backend selection, packing maps, operand caching and the CUDA 2:4 code paths, all on CPU.

The CUDA library calls are replaced by a CPU implementation of the cuSPARSELt-style packing
(kept values row-major, then per-group metadata), so everything around them (index maps, in-place
refreshes, column-mask steps, dense fallbacks, fused adapter inference, error messages) is checked
here; tests/gpu/ runs the same paths on the real kernels against the reference.
"""

import pytest
import torch
from torch import nn

from slope import SlopeConfig, SlopeLinear, column_mask, nm_mask
from slope.backends import kernels
from slope.backends.kernels import Compressed, OperandCache, ProductPlan, SemiStructuredBackend
from slope.masks import gather_values, pack_group_bits, scatter_values, unpack_group_bits

# ---- a CPU implementation of the packing -------------------------------------------------------


def emulated_compress(self, dense):
    """[kept values, row-major (rows*cols/2) | one metadata number per group (rows*cols/4)].

    Groups with fewer than 2 non-zeros keep zeros by the tie rule of nm_mask, like a real compressor
    has to choose some position for them.
    """
    keep = nm_mask(dense, 2, 4, dim=1)
    values = gather_values(dense, keep)
    meta = pack_group_bits(keep, 4, dim=1).to(dense.dtype)
    return torch.cat([values.reshape(-1), meta.reshape(-1)]), None


def emulated_mm_t(self, b, a, kernel=("tr", 0)):
    values = a.packed[: a.kept].view(a.rows, a.cols // 2)
    bits = a.packed[a.kept :].to(torch.uint8).view(a.rows, a.cols // 4)
    return b @ scatter_values(values, unpack_group_bits(bits, 4, dim=1)).t()


def shuffled_compress(self, dense):
    """A packing whose values are not in gather order (reversed per row): in-place must be refused."""
    packed, meta = emulated_compress(self, dense)
    kept = dense.numel() // 2
    vals = packed[:kept].view(dense.shape[0], -1).flip(1).reshape(-1)
    return torch.cat([vals, packed[kept:]]), meta


def shuffled_mm_t(self, b, a, kernel=("tr", 0)):
    vals = a.packed[: a.kept].view(a.rows, -1).flip(1).reshape(-1)
    return emulated_mm_t(self, b, Compressed(a.rows, a.cols, torch.cat([vals, a.packed[a.kept :]]), None, a.inplace))


@pytest.fixture
def emulated(monkeypatch):
    """Route the cusparselt library calls to the CPU packing and pretend this CPU is an sm90 GPU."""
    monkeypatch.setattr(SemiStructuredBackend, "_compress_raw", emulated_compress)
    monkeypatch.setattr(SemiStructuredBackend, "_mm_t_raw", emulated_mm_t)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda kind, **kw: None if kind == "cusparselt" else "no")
    monkeypatch.setattr(kernels, "measure_products", lambda *a, **k: {"output": 1.5, "grad_input": 1.2})
    monkeypatch.setattr(kernels, "fused_is_faster", lambda fused, two_path: True)
    monkeypatch.setattr(kernels, "_PLANS", {})
    monkeypatch.setattr(kernels, "_LAYOUTS", {})


def layer_masks(out_f=32, in_f=64, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    w = torch.randn(out_f, in_f, dtype=dtype)
    row_mask = nm_mask(w, 2, 4, dim=1)
    w_r = w * row_mask
    return w_r, row_mask, column_mask(w_r, 2, 4)


def backend(dtype=torch.float64, shape=(32, 64), inplace=True, **plan):
    return SemiStructuredBackend("cusparselt", dtype, shape, ProductPlan(**plan), inplace=inplace)


# ---- selection and its errors ------------------------------------------------------------------


def test_auto_is_reference_on_cpu():
    be = kernels.select_backend("auto", device=torch.device("cpu"), dtype=torch.bfloat16, n=2, m=4, shape=(64, 64))
    assert be is kernels.REFERENCE
    assert kernels.select_backend("reference", device="cpu", dtype=torch.float32, n=1, m=4, shape=(8, 8)) is kernels.REFERENCE


@pytest.mark.parametrize("kind", ["cusparselt", "cutlass"])
def test_explicit_backend_on_cpu_names_the_device(kind):
    with pytest.raises(RuntimeError, match=rf"backend '{kind}' cannot run .*\(64, 128\).*device cpu is not a CUDA device"):
        kernels.select_backend(kind, device=torch.device("cpu"), dtype=torch.bfloat16, n=2, m=4, shape=(64, 128))


def test_unknown_backend_lists_the_allowed():
    with pytest.raises(ValueError, match=r"unknown backend 'triton'.*'auto', 'reference', 'cusparselt', 'cutlass'"):
        kernels.select_backend("triton", device="cpu", dtype=torch.bfloat16, n=2, m=4, shape=(64, 64))


@pytest.mark.parametrize(
    ("kind", "cap", "dtype", "nm", "shape", "cusparselt", "message"),
    [
        ("cusparselt", (7, 5), torch.float16, (2, 4), (64, 64), True, r"compute capability 7\.5; .*8\.0 or newer"),
        ("cutlass", (9, 0), torch.float16, (2, 4), (64, 64), True, r"capability 9\.0; .*CUTLASS .*sm8x only"),
        ("cusparselt", (9, 0), torch.float32, (2, 4), (64, 64), True, r"dtype torch\.float32 is not supported"),
        ("cusparselt", (8, 0), torch.bfloat16, (2, 8), (64, 64), True, r"pattern 2:8 is not supported"),
        ("cusparselt", (9, 0), torch.bfloat16, (2, 4), (48, 40), True, r"in=40 is not a multiple of 16"),
        ("cutlass", (8, 0), torch.bfloat16, (2, 4), (96, 128), True, r"out=96 is not a multiple of 64"),
        ("cusparselt", (9, 0), torch.bfloat16, (2, 4), (64, 64), False, r"has no cuSPARSELt"),
    ],
)
def test_unavailable_reasons(monkeypatch, kind, cap, dtype, nm, shape, cusparselt, message):
    monkeypatch.setattr(kernels, "_capability", lambda device: cap)
    monkeypatch.setattr(kernels, "_cusparselt_available", lambda: cusparselt)
    reason = kernels.unavailable_reason(kind, device=torch.device("cuda"), dtype=dtype, n=nm[0], m=nm[1], shape=shape)
    assert reason is not None
    assert __import__("re").search(message, reason), reason
    with pytest.raises(RuntimeError, match=message):
        kernels.select_backend(kind, device=torch.device("cuda"), dtype=dtype, n=nm[0], m=nm[1], shape=shape)


def test_auto_falls_back_per_product(emulated, monkeypatch):
    monkeypatch.setattr(kernels, "measure_products", lambda *a, **k: {"output": 1.4, "grad_input": 0.8})
    be = kernels.select_backend("auto", device="cpu", dtype=torch.float64, n=2, m=4, shape=(32, 64), tokens=100)
    assert isinstance(be, SemiStructuredBackend)
    assert be.plan.sparse_output and not be.plan.sparse_grad_input
    assert "grad_input dense (sparse measured 0.80x of dense)" in be.describe()
    # one measurement per (backend, device, dtype, shape, token bucket)
    again = kernels.select_backend("auto", device="cpu", dtype=torch.float64, n=2, m=4, shape=(32, 64), tokens=200)
    assert again.plan is be.plan


def test_auto_keeps_unsupported_shapes_dense(emulated):
    be = kernels.select_backend("auto", device="cpu", dtype=torch.float64, n=2, m=4, shape=(40, 64))
    assert not be.plan.sparse_output and not be.plan.sparse_grad_input
    assert "out=40 is not a multiple of 16" in be.describe()


def test_explicit_backend_never_falls_back(emulated, monkeypatch):
    # an explicit backend still tunes its kernels, but runs them even where dense is faster
    monkeypatch.setattr(kernels, "measure_products",
                        lambda *a, **k: {"output": 0.5, "grad_input": 0.5, "kernel": {"output": ("nt", 3)}})
    be = kernels.select_backend("cusparselt", device="cpu", dtype=torch.float64, n=2, m=4, shape=(32, 64))
    assert be.plan.sparse_output and be.plan.sparse_grad_input and be.inplace
    assert be.plan.kernel == {"output": ("nt", 3), "grad_input": ("tr", 0)}


def test_kernel_tuning_picks_the_fastest_candidate(emulated, monkeypatch):
    # measure_products itself, with the CPU packing and fake timings: ("nt", 7) is fastest
    monkeypatch.undo()
    monkeypatch.setattr(SemiStructuredBackend, "_compress_raw", emulated_compress)
    monkeypatch.setattr(SemiStructuredBackend, "_mm_t_raw", emulated_mm_t)
    monkeypatch.setattr(SemiStructuredBackend, "search_alg", lambda self, b, a, layout: 7 if layout == "nt" else 0)
    calls = []

    def fake_time(fn, reps=10):
        calls.append(fn)
        fn()
        return {1: 2.0, 2: 3.0, 3: 1.0}.get(len(calls) % 4, 4.0)  # per product: tr0, nt0, nt7, dense

    monkeypatch.setattr(kernels, "_time_ms", fake_time)
    monkeypatch.setattr(kernels, "_LAYOUTS", {})
    monkeypatch.setattr(kernels, "_TUNE_MIN_DIM", 1)
    result = kernels.measure_products("cusparselt", "cpu", torch.bfloat16, (32, 64), 16)
    assert result["kernel"] == {"output": ("nt", 7), "grad_input": ("nt", 7)}
    assert result["output"] == 4.0 and result["grad_input"] == 4.0
    assert len(calls) == 8
    # fp16 never runs cuSPARSELt's search (see measure_products): only the two default layouts
    calls.clear()
    result = kernels.measure_products("cusparselt", "cpu", torch.float16, (32, 64), 16)
    assert set(result["kernel"].values()) <= {("tr", 0), ("nt", 0)}


def test_numerics_check_rejects_a_wrong_kernel(emulated, monkeypatch):
    assert kernels.numerics_check("cusparselt", "cpu", torch.bfloat16, (32, 64)) < kernels._tolerance(torch.bfloat16)
    monkeypatch.setattr(SemiStructuredBackend, "_mm_t_raw", lambda self, b, a, kernel=None: 1.1 * emulated_mm_t(self, b, a))
    with pytest.raises(kernels.NumericsError, match=r"cusparselt output for shape \(32, 64\).*above the tolerance"):
        kernels.numerics_check("cusparselt", "cpu", torch.bfloat16, (32, 64))
    with pytest.raises(RuntimeError, match="differs from the reference"):
        kernels.select_backend("cusparselt", device="cpu", dtype=torch.bfloat16, n=2, m=4, shape=(32, 64))


# ---- packing maps ------------------------------------------------------------------------------


def test_layout_check_accepts_gather_order_and_refuses_others(emulated, monkeypatch):
    assert kernels.layout_check("cusparselt", "cpu", torch.bfloat16)
    monkeypatch.setattr(SemiStructuredBackend, "_compress_raw", shuffled_compress)
    monkeypatch.setattr(kernels, "_LAYOUTS", {})
    assert not kernels.layout_check("cusparselt", "cpu", torch.bfloat16)


def test_cutlass_packing_keeps_values_in_gather_order():
    # PyTorch's CUTLASS packing is plain tensor code, so its layout can be checked on CPU too.
    kernels._LAYOUTS.pop(("cutlass", "cpu", torch.float16), None)
    assert kernels.layout_check("cutlass", "cpu", torch.float16)
    w_r, row_mask, _ = layer_masks(64, 128, dtype=torch.float32)
    be = SemiStructuredBackend("cutlass", torch.float16, (64, 128), ProductPlan(), inplace=True)
    structured = be.compress_structured(row_mask, gather_values(w_r, row_mask))
    plain = be.compress(w_r)
    assert torch.equal(structured.packed, plain.packed) and torch.equal(structured.meta, plain.meta)


def test_kernel_tuning_keeps_the_default_when_a_candidate_fails(emulated, monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr(SemiStructuredBackend, "_compress_raw", emulated_compress)
    monkeypatch.setattr(SemiStructuredBackend, "_mm_t_raw", emulated_mm_t)

    def broken_search(self, b, a, layout):
        raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED")

    monkeypatch.setattr(SemiStructuredBackend, "search_alg", broken_search)
    monkeypatch.setattr(kernels, "_time_ms", lambda fn, reps=10: (fn(), 1.0)[1])
    monkeypatch.setattr(kernels, "_TUNE_MIN_DIM", 1)
    result = kernels.measure_products("cusparselt", "cpu", torch.float64, (32, 64), 16)
    assert result["kernel"]["output"] in {("tr", 0), ("nt", 0)}


def test_value_index_matches_the_packing_of_w_rc_transposed():
    w_r, row_mask, col_mask = layer_masks(48, 64)
    values = gather_values(w_r, row_mask)
    idx = kernels.value_index(row_mask, col_mask.t())
    assert idx.shape == (64, 24)
    flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
    expected = kernels.packing_reference(gather_values((w_r * col_mask).t(), col_mask.t()), col_mask.t())
    assert torch.equal(flat[idx], expected)
    # every stored value lands at most once; slots outside M_R point at the appended zero
    real = idx[idx < values.numel()]
    assert real.unique().numel() == real.numel()


def test_split_two_four_is_exact_and_two_four():
    a_t = torch.randn(12, 64, dtype=torch.float64)
    p1, p2 = kernels.split_two_four(a_t)
    assert torch.equal(p1 + p2, a_t)
    for p in (p1, p2):
        assert ((p != 0).view(12, 16, 4).sum(-1) <= 2).all()


# ---- operand cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False])
def test_operand_cache_refreshes_only_on_change(emulated, inplace):
    w_r, row_mask, col_mask = layer_masks()
    values = gather_values(w_r, row_mask).clone()
    be = backend(inplace=inplace)
    cache = OperandCache(be)
    x = torch.randn(10, 64, dtype=torch.float64)
    dy = torch.randn(10, 32, dtype=torch.float64)
    for step in range(3):
        if step:
            values.mul_(0.9).add_(0.1)  # an optimizer step
        for _ in range(2):  # a second forward at the same version reuses the operands
            out_op = cache.output(values, row_mask, "rows")
            gi_op = cache.grad_input(values, row_mask, col_mask, ("rows", 0))
        w = scatter_values(values, row_mask)
        torch.testing.assert_close(be.output(x, out_op), x @ w.t(), rtol=0, atol=1e-12)
        torch.testing.assert_close(be.grad_input(dy, gi_op), dy @ (w * col_mask), rtol=0, atol=1e-12)
    expected = {"output": 1, "output_inplace": 2, "grad_input": 1, "grad_input_inplace": 2} if inplace else \
        {"output": 3, "output_inplace": 0, "grad_input": 3, "grad_input_inplace": 0}
    assert cache.rebuilds == expected
    # a new column mask is a rebuild, not an in-place write
    new_col = column_mask(scatter_values(values, row_mask).flip(0), 2, 4).flip(0)
    gi_op = cache.grad_input(values, row_mask, new_col, ("rows", 1))
    torch.testing.assert_close(be.grad_input(dy, gi_op), dy @ (scatter_values(values, row_mask) * new_col))
    assert cache.rebuilds["grad_input"] == expected["grad_input"] + 1


def test_in_place_update_is_right_when_a_kept_value_is_zero(emulated):
    # the metadata comes from the mask, so a kept value that is exactly 0 at compression time
    # (ambiguous for a compressor reading values) still lands where it belongs after an update
    w_r, row_mask, _ = layer_masks()
    values = gather_values(w_r, row_mask).clone()
    values[:, 1] = 0.0
    cache = OperandCache(backend())
    op = cache.output(values, row_mask, "rows")
    values[:, 1] = 3.0
    op = cache.output(values, row_mask, "rows")
    assert cache.rebuilds["output_inplace"] == 1
    x = torch.randn(4, 64, dtype=torch.float64)
    torch.testing.assert_close(cache.backend.output(x, op), x @ scatter_values(values, row_mask).t())


def test_dense_plan_uses_dense_operands(emulated):
    w_r, row_mask, col_mask = layer_masks()
    values = gather_values(w_r, row_mask)
    cache = OperandCache(backend(sparse_output=False, sparse_grad_input=False))
    assert torch.equal(cache.output(values, row_mask, 0), w_r)
    assert torch.equal(cache.grad_input(values, row_mask, col_mask, 0), w_r * col_mask)
    # without double pruning W_Rᵀ is not 2:4 along out, so grad_input is dense even on a sparse plan
    sparse = OperandCache(backend())
    assert torch.equal(sparse.grad_input(values, row_mask, None, 0), w_r)


# ---- SlopeLinear on the emulated backend --------------------------------------------------------


def paired_layers(interval=1, **cfg):
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, dtype=torch.float64)
    ref = SlopeLinear.from_dense(dense, SlopeConfig(backward_mask_interval=interval, backend="reference", **cfg))
    dense2 = nn.Linear(64, 32, dtype=torch.float64)
    dense2.load_state_dict(dense.state_dict())
    sparse = SlopeLinear.from_dense(dense2, SlopeConfig(backward_mask_interval=interval, backend="cusparselt", **cfg))
    return ref, sparse


@pytest.mark.parametrize("interval", [1, 3])
def test_training_matches_reference(emulated, interval):
    ref, sparse = paired_layers(interval)
    opts = [torch.optim.AdamW(layer.parameters(), lr=1e-2) for layer in (ref, sparse)]
    for step in range(5):
        x = torch.randn(2, 7, 64, dtype=torch.float64)
        outs = []
        for layer, opt in zip((ref, sparse), opts, strict=True):
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            (y.square().sum() + y.sum()).backward()
            outs.append((y.detach(), xi.grad, layer.weight.grad.clone()))
            opt.step()
            opt.zero_grad()
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"step {step}")
    assert torch.equal(ref.col_bits, sparse.col_bits)
    (cache,) = sparse._operand_caches.values()
    assert cache.rebuilds["output"] == 1 and cache.rebuilds["output_inplace"] == 4
    assert cache.rebuilds["grad_input"] == (5 if interval == 1 else 2)  # steps 0 and 3 refresh M_C


@pytest.mark.parametrize("speedups", [(0.5, 0.5), (1.5, 0.5), (0.5, 1.5)])
def test_dense_fallbacks_under_autocast_match_reference_and_scatter_once(emulated, monkeypatch, speedups):
    # fp32 master values, bf16 products: dense fallback operands are built in bf16 directly, and a
    # dense grad_input operand is M_C applied to the forward's dense W_R, not a second scatter
    out_speed, gi_speed = speedups
    monkeypatch.setattr(kernels, "measure_products", lambda *a, **k: {"output": out_speed, "grad_input": gi_speed})
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    ref = SlopeLinear.from_dense(dense, SlopeConfig(backend="reference"))
    fast = SlopeLinear.from_dense(nn.Linear(64, 32), SlopeConfig(backend="auto"))
    fast.load_state_dict(ref.state_dict())
    from slope import linear

    scatters = []
    real_scatter = linear.scatter_kept
    monkeypatch.setattr(linear, "scatter_kept", lambda *a: scatters.append(a[0].dtype) or real_scatter(*a))
    x = torch.randn(3, 8, 64)
    grads = []
    for layer in (ref, fast):
        scatters.clear()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().sum().backward()
        grads.append((y, xi.grad, layer.weight.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    be = next(iter(fast._backend_cache.values()))
    assert (be.plan.sparse_output, be.plan.sparse_grad_input) == (out_speed >= 1, gi_speed >= 1)
    # scatters of the fast layer: fp32 W_R for the column mask, then bf16 W_R only where an operand is
    # dense and nothing dense was built before it
    expected = [torch.float32] + ([torch.bfloat16] if not (be.plan.sparse_output and be.plan.sparse_grad_input) else [])
    assert scatters == expected


def test_cached_path_builds_gradient_positions_in_backward_only(emulated, monkeypatch):
    # held from forward to backward, int64 positions would cost 4 bytes per weight at the step's peak
    from slope import linear

    calls = []
    real = linear.kept_positions
    monkeypatch.setattr(linear, "kept_positions", lambda *a: calls.append(phase[0]) or real(*a))
    ref, sparse = paired_layers(interval=3)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    phase = [""]
    for step in range(3):
        x = torch.randn(5, 64, dtype=torch.float64)
        calls.clear()
        phase[0] = "forward"
        y = sparse(x)
        phase[0] = "backward"
        y.square().sum().backward()
        # step 0 refreshes M_C from W_R, which needs the positions in forward too (then drops them)
        assert calls == (["forward", "backward"] if step == 0 else ["backward"]), step
        ref(x).square().sum().backward()
        torch.testing.assert_close(sparse.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad()


def test_no_double_prune_keeps_grad_input_dense(emulated):
    ref, sparse = paired_layers(double_prune=False)
    x = torch.randn(6, 64, dtype=torch.float64, requires_grad=True)
    sparse(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)


def test_fused_adapter_inference_matches_two_path(emulated):
    ref, sparse = paired_layers()
    for layer in (ref, sparse):
        torch.manual_seed(1)
        layer.add_adapter(5)
        nn.init.normal_(layer.adapter_b)
    x = torch.randn(3, 9, 64, dtype=torch.float64)
    with torch.no_grad():
        y_ref, y = ref(x), sparse(x)
    assert sparse._fused is not None and sparse._fused._op is not None  # the fused path ran
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    assert next(iter(sparse._backend_cache.values())).plan.fused_inference is True


def test_reference_layer_keeps_no_operands():
    layer = SlopeLinear.from_dense(nn.Linear(64, 32), SlopeConfig())
    layer(torch.randn(3, 64)).sum().backward()
    assert layer._operand_caches == {} and layer._fused is None


def test_backend_summary_one_line(emulated, monkeypatch):
    monkeypatch.setattr(kernels, "measure_products", lambda *a, **k: {"output": 1.3, "grad_input": 0.9})
    layers = [SlopeLinear.from_dense(nn.Linear(64, 32, dtype=torch.float64), SlopeConfig()) for _ in range(2)]
    layers.append(SlopeLinear.from_dense(nn.Linear(64, 40, dtype=torch.float64), SlopeConfig(double_prune=False)))
    assert kernels.backend_summary(layers) == "slope backends: no layer has run yet"
    for layer in layers:
        layer(torch.randn(4, 64, dtype=torch.float64))
    line = kernels.backend_summary([("l", layer) for layer in layers])
    assert "\n" not in line
    assert line.startswith("slope backends: cusparselt x3; dense fallbacks: ")
    assert "2 layer(s) (32, 64): grad_input dense (sparse measured 0.90x of dense)" in line
    assert "1 layer(s) (40, 64): shape (out=40, in=64): out=40 is not a multiple of 16" in line


# ---- slope info ---------------------------------------------------------------------------------


def test_info_command_on_cpu(capsys):
    from slope.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference: works" in out
    assert "cusparselt: unavailable" in out


def test_info_json(capsys):
    import json

    from slope.cli import main

    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["reference"] is None and isinstance(data["backends"]["cusparselt"], str)
